"""A user's own job table (the seed's ``system_jobs`` shape), through a column mapping."""

from __future__ import annotations

from typing import Any

from kombu.utils.imports import symbol_by_name
from sqlalchemy import Column, DateTime, Enum, MetaData, Table, exc, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.types import Date

from ..errors import ConfigurationError
from ..settings import SourceSpec
from .base import Candidate, SettleTarget, keyset_batch


def resolve_table(spec: SourceSpec, conn: Connection) -> Table:
    """Turn ``table`` (name, ``Table``, declarative model or ``"pkg.mod:attr"``) into a ``Table``.

    Names are reflected from the database, so configuration never reaches SQL as text.
    """
    key = f"{spec.key}.table"
    table: Any = spec.table
    if isinstance(table, str) and ":" in table:
        try:
            table = symbol_by_name(table)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigurationError(key, f"cannot import {spec.table!r}: {error}") from error
    table = getattr(table, "__table__", table)
    if isinstance(table, Table):
        return table
    if not isinstance(table, str):
        raise ConfigurationError(key, f"expected a table name, Table or model, got {table!r}")
    # Only names, types and the primary key are read (not indexes, constraints, comments):
    # that is all jobreaper needs, and a worker start pays for every reflection query.
    inspector = inspect(conn)
    try:
        columns = inspector.get_columns(table, schema=spec.schema)
        primary = inspector.get_pk_constraint(table, schema=spec.schema)
    except exc.NoSuchTableError:
        columns = []
    if not columns:
        where = f" in schema {spec.schema!r}" if spec.schema else ""
        raise ConfigurationError(key, f"no table named {table!r}{where} in the database")
    keys = set(primary.get("constrained_columns") or ())
    return Table(
        table,
        MetaData(),
        *(Column(c["name"], c["type"], primary_key=c["name"] in keys) for c in columns),
        schema=spec.schema,
    )


class UserTableSource:
    """Rows of a user table whose status is one of ``stale_statuses``."""

    def __init__(self, spec: SourceSpec, table: Table) -> None:
        self.spec = spec
        self.name = spec.name
        self.table = table
        self.cols: dict[str, Column[Any]] = {}
        for role, column in spec.columns.items():
            if column is None:
                continue
            if column not in table.c:
                raise ConfigurationError(
                    f"{spec.key}.{role}",
                    f"table {table.name!r} has no column {column!r} "
                    f"(it has: {', '.join(c.name for c in table.c)})",
                )
            self.cols[role] = table.c[column]
        self._check_types()
        self.has_owner = "owner" in self.cols
        self.has_task_id = "task_id" in self.cols
        guards = {role: self.cols[role] for role in ("owner",) if role in self.cols}
        self.target = SettleTarget(
            table=table,
            id=self.cols["id"],
            status=self.cols["status"],
            stale_statuses=spec.stale_statuses,
            failed_status=spec.failed_status,
            completed_at=self.cols.get("completed_at"),
            error=self.cols.get("error"),
            guards=guards,
        )

    def _check_types(self) -> None:
        status_type = self.cols["status"].type
        if isinstance(status_type, Enum) and status_type.enums:
            allowed = set(status_type.enums)
            for value in (*self.spec.stale_statuses, self.spec.failed_status):
                if value not in allowed:
                    raise ConfigurationError(
                        f"{self.spec.key}.stale_statuses"
                        if value in self.spec.stale_statuses
                        else f"{self.spec.key}.failed_status",
                        f"{value!r} is not a value of column {self.cols['status'].name!r} "
                        f"(allowed: {sorted(allowed)})",
                    )
        for role in ("started_at", "completed_at"):
            col = self.cols.get(role)
            if col is not None and not isinstance(col.type, (DateTime, Date)):
                raise ConfigurationError(
                    f"{self.spec.key}.{role}",
                    f"column {col.name!r} is {col.type}, expected a date/time column",
                )

    def owners(self, conn: Connection) -> tuple[set[str], set[str]]:
        """Node names owning stale-status rows (when the table has an owner column)."""
        if not self.has_owner:
            return set(), set()
        owner = self.cols["owner"]
        rows = conn.execute(select(owner).where(self._stale()).distinct())
        return set(), {r[0] for r in rows if r[0]}

    def _stale(self) -> Any:
        return self.cols["status"].in_(self.spec.stale_statuses)

    def batch(self, conn: Connection, after: Any, limit: int) -> list[Candidate]:
        """Stale-status rows, in primary-key order."""
        roles = [
            r for r in ("id", "status", "kind", "started_at", "owner", "task_id") if r in self.cols
        ]
        cols = [self.cols[r].label(r) for r in roles]
        rows = keyset_batch(
            conn,
            id_col=self.cols["id"],
            columns=cols,
            where=self._stale(),
            after=after,
            limit=limit,
        )
        # Positions instead of row._mapping lookups: this loop runs once per stale row.
        at = {role: i for i, role in enumerate(roles)}
        i_id, i_status = at["id"], at["status"]
        i_kind, i_started = at.get("kind"), at.get("started_at")
        i_owner, i_task = at.get("owner"), at.get("task_id")
        out = []
        for row in rows:
            kind = None if i_kind is None else row[i_kind]
            task_id = None if i_task is None else row[i_task]
            out.append(
                Candidate(
                    self.name,
                    row[i_id],
                    row[i_status],
                    None if kind is None else str(kind),
                    None if i_started is None else row[i_started],
                    None if i_owner is None else row[i_owner],
                    None,
                    None if task_id is None else str(task_id),
                )
            )
        return out
