"""User job tables as configured: the column roles and :class:`SourceSpec`, checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import tzinfo
from typing import Any

from .errors import ConfigurationError
from .timezones import zone_named
from .values import optional_seconds

COLUMN_ROLES: tuple[str, ...] = (
    "id",
    "status",
    "kind",
    "started_at",
    "completed_at",
    "error",
    "owner",
    "task_id",
)
REQUIRED_ROLES: tuple[str, ...] = ("id", "status")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One user job table, mapped onto the roles jobreaper understands."""

    key: str  #: the settings key this came from, e.g. ``jobreaper_sources[0]``, for errors
    table: Any  #: table name, :class:`~sqlalchemy.Table`, declarative model or ``"pkg.mod:attr"``
    name: str  #: label used in logs and the ledger
    columns: Mapping[str, str | None]  #: role -> column name (``None`` when the table lacks it)
    stale_statuses: tuple[str, ...]
    failed_status: str
    schema: str | None = None
    #: IANA name of the zone naive ``started_at`` values are written in (default ``"UTC"``)
    timezone: str = "UTC"
    #: that zone, or ``None`` for UTC (naive values are then taken as UTC, as they are)
    zone: tzinfo | None = None
    #: seconds after ``completed_at`` a row in one of ``prune_statuses`` is deleted by a prune
    #: (``None``: rows of this table are never deleted)
    prune_after: float | None = None
    prune_statuses: tuple[str, ...] = ()


def parse_sources(value: Any) -> list[SourceSpec]:
    """``jobreaper_sources``: one mapping or a list of them, each a :class:`SourceSpec`."""
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ConfigurationError("jobreaper_sources", "expected a list of table mappings")
    return [parse_source(f"jobreaper_sources[{i}]", raw) for i, raw in enumerate(value)]


def parse_source(key: str, raw: Any) -> SourceSpec:
    """One source mapping, checked (each error names ``jobreaper_sources[i].<key>``)."""
    if not isinstance(raw, Mapping):
        raise ConfigurationError(key, "expected a mapping with at least 'table', 'id', 'status'")
    known = {
        "table",
        "name",
        "schema",
        "stale_statuses",
        "failed_status",
        "timezone",
        "prune_after",
        "prune_statuses",
        *COLUMN_ROLES,
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigurationError(f"{key}.{unknown[0]}", f"unknown key; known: {sorted(known)}")
    table = raw.get("table")
    if table is None or (isinstance(table, str) and not table.strip()):
        raise ConfigurationError(f"{key}.table", "missing: name the job table")
    columns: dict[str, str | None] = {}
    for role in COLUMN_ROLES:
        column = raw.get(role, role if role in REQUIRED_ROLES else None)
        if column is not None and (not isinstance(column, str) or not column):
            raise ConfigurationError(f"{key}.{role}", f"expected a column name, got {column!r}")
        columns[role] = column
    stale = raw.get("stale_statuses", ("running", "scheduled"))
    if isinstance(stale, str) or not isinstance(stale, Sequence) or not stale:
        raise ConfigurationError(f"{key}.stale_statuses", "expected a non-empty list of statuses")
    if not all(isinstance(s, str) and s for s in stale):
        raise ConfigurationError(f"{key}.stale_statuses", f"expected strings, got {stale!r}")
    failed = raw.get("failed_status", "failed")
    if not isinstance(failed, str) or not failed:
        raise ConfigurationError(f"{key}.failed_status", f"expected a status, got {failed!r}")
    if failed in stale:
        raise ConfigurationError(
            f"{key}.failed_status",
            f"{failed!r} is also listed in stale_statuses; settled jobs would be settled again",
        )
    schema = raw.get("schema")
    if schema is not None and not isinstance(schema, str):
        raise ConfigurationError(f"{key}.schema", f"expected a schema name, got {schema!r}")
    timezone = raw.get("timezone", "UTC")
    zone = zone_named(f"{key}.timezone", timezone)
    name = raw.get("name") or table_label(table)
    prune_after, prune_statuses = prune_of(key, raw, columns, tuple(stale))
    return SourceSpec(
        key=key,
        table=table,
        name=str(name),
        columns=columns,
        stale_statuses=tuple(stale),
        failed_status=failed,
        schema=schema,
        timezone=timezone,
        zone=zone,
        prune_after=prune_after,
        prune_statuses=prune_statuses,
    )


def prune_of(
    key: str, raw: Mapping[str, Any], columns: Mapping[str, str | None], stale: tuple[str, ...]
) -> tuple[float | None, tuple[str, ...]]:
    """A source's opt-in to pruning: ``prune_after`` seconds, for ``prune_statuses`` rows."""
    after = optional_seconds(f"{key}.prune_after", raw.get("prune_after"))
    statuses = raw.get("prune_statuses")
    if after is None:
        if statuses is not None:
            raise ConfigurationError(f"{key}.prune_statuses", "set prune_after (seconds) too")
        return None, ()
    if columns.get("completed_at") is None:
        raise ConfigurationError(
            f"{key}.prune_after", "needs the completed_at column mapped (rows age from it)"
        )
    if isinstance(statuses, str) or not isinstance(statuses, Sequence) or not statuses:
        raise ConfigurationError(
            f"{key}.prune_statuses", "expected the finished statuses to delete, e.g. ['completed']"
        )
    if not all(isinstance(s, str) and s for s in statuses):
        raise ConfigurationError(f"{key}.prune_statuses", f"expected strings, got {statuses!r}")
    live = sorted(set(statuses) & set(stale))
    if live:
        raise ConfigurationError(
            f"{key}.prune_statuses", f"{live[0]!r} is a stale (running) status; never deleted"
        )
    return after, tuple(statuses)


def table_label(table: Any) -> str:
    """The name shown for a source given as a name, ``Table`` or model."""
    if isinstance(table, str):
        return table.rsplit(":", 1)[-1]
    for attr in ("__tablename__", "name"):
        label = getattr(table, attr, None)
        if isinstance(label, str):
            return label
    return repr(table)
