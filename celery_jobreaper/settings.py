"""The ``jobreaper_*`` settings: defaults, validation, and the frozen :class:`Settings`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from datetime import timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

from celery.utils.time import maybe_timedelta

from .errors import ConfigurationError
from .timezones import zone_named

if TYPE_CHECKING:
    from celery import Celery

#: Seconds between two heartbeats of a worker's incarnation row.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: Seconds without a heartbeat after which a worker becomes a suspect (it is then pinged once).
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
#: Seconds between two periodic reaps by a running worker.
DEFAULT_INTERVAL = 60.0
#: Seconds: jobs younger than this are never settled by the "no owner known" rule.
DEFAULT_GRACE = 0.0
#: Seconds to wait for ping/inspect replies from suspects (never a blind broadcast).
DEFAULT_PING_TIMEOUT = 1.0
#: Seconds to wait for a database connection before giving up on this attempt.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Rows per transaction when settling jobs.
DEFAULT_BATCH_SIZE = 1000
#: Seconds a durably revoked task id is kept (Celery's own default for its in-memory set).
DEFAULT_REVOKED_EXPIRES = 10800.0
#: Seconds after settling a user-table row during which reaps look for a late write to it.
DEFAULT_LATE_WRITE_WINDOW = 10800.0
#: Seconds an unacked Redis message must have been held before a sweep may restore or drop it.
DEFAULT_UNACKED_GRACE = 60.0
#: A RabbitMQ sweep never hands a message back with more deliveries counted than this
#: (``x-delivery-count`` of quorum queues), nor with as many as the queue's declared
#: ``x-delivery-limit``: it stops at the message that reaches the cap.
DEFAULT_AMQP_MAX_DELIVERIES = 10
#: seconds one webhook POST may take before it counts as failed
DEFAULT_WEBHOOK_TIMEOUT = 5.0
#: further tries of a webhook POST that timed out or got a 5xx/408/429 answer
DEFAULT_WEBHOOK_RETRIES = 3
#: seconds finished tracked jobs, runs and ledger events are kept before a prune deletes them
DEFAULT_RETENTION = 30 * 86400.0
#: rows one prune deletes at most (over every table); the next prune goes on
DEFAULT_PRUNE_MAX_ROWS = 100_000
#: Engine options used when jobreaper creates its own engine (Celery's own choice).
DEFAULT_ENGINE_OPTIONS: Mapping[str, Any] = {"pool_pre_ping": True, "pool_recycle": 3600}

Action = Literal["fail", "ignore"]
ACTIONS: tuple[str, ...] = ("fail", "ignore")
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


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated, immutable jobreaper configuration; build it with :meth:`from_app`."""

    enabled: bool = True
    database_url: str | None = None
    engine: Any = None
    engine_options: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_ENGINE_OPTIONS)
    )
    sources: tuple[SourceSpec, ...] = ()
    track_tasks: bool = True
    track_task_names: tuple[str, ...] = ("*",)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    interval: float = DEFAULT_INTERVAL
    grace: float = DEFAULT_GRACE
    max_age: float | None = None
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    batch_size: int = DEFAULT_BATCH_SIZE
    dry_run: bool = False
    strict: bool = False
    create_tables: bool = True
    policies: tuple[tuple[str, Action], ...] = ()
    queue_cleanup: Literal["selective", "purge", "off"] = "selective"
    revoked_expires: float = DEFAULT_REVOKED_EXPIRES
    late_write_window: float = DEFAULT_LATE_WRITE_WINDOW
    unacked_grace: float = DEFAULT_UNACKED_GRACE
    amqp_max_deliveries: int = DEFAULT_AMQP_MAX_DELIVERIES
    webhooks: tuple[str, ...] = ()
    webhook_timeout: float = DEFAULT_WEBHOOK_TIMEOUT
    webhook_retries: int = DEFAULT_WEBHOOK_RETRIES
    webhook_headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    retention: float | None = DEFAULT_RETENTION
    prune_max_rows: int = DEFAULT_PRUNE_MAX_ROWS

    @classmethod
    def from_app(cls, app: Celery, **overrides: Any) -> Settings:
        """Read every ``jobreaper_*`` key of ``app.conf``; *overrides* win over configuration."""
        conf = app.conf

        def get(name: str, default: Any = None) -> Any:
            if name in overrides:
                return overrides[name]
            return conf.get(f"jobreaper_{name}", default)

        database_url = get("database_url")
        if database_url is not None and not isinstance(database_url, str):
            raise ConfigurationError("jobreaper_database_url", "expected a SQLAlchemy URL string")
        engine = get("engine")
        if engine is not None and not (isinstance(engine, str) or hasattr(engine, "connect")):
            raise ConfigurationError(
                "jobreaper_engine", "expected an Engine or a 'package.module:attribute' string"
            )
        engine_options = get("engine_options", None)
        if engine_options is None:
            engine_options = dict(DEFAULT_ENGINE_OPTIONS)
        elif not isinstance(engine_options, Mapping):
            raise ConfigurationError("jobreaper_engine_options", "expected a mapping")
        heartbeat_interval = _seconds(
            "jobreaper_heartbeat_interval",
            get("heartbeat_interval"),
            DEFAULT_HEARTBEAT_INTERVAL,
            positive=True,
        )
        heartbeat_timeout = _seconds(
            "jobreaper_heartbeat_timeout",
            get("heartbeat_timeout"),
            DEFAULT_HEARTBEAT_TIMEOUT,
            positive=True,
        )
        if heartbeat_timeout <= heartbeat_interval:
            raise ConfigurationError(
                "jobreaper_heartbeat_timeout",
                f"must be greater than jobreaper_heartbeat_interval ({heartbeat_interval:g} s), "
                f"got {heartbeat_timeout:g} s",
            )
        max_age_raw = get("max_age")
        settings = cls(
            enabled=_flag("jobreaper_enabled", get("enabled", True)),
            database_url=database_url,
            engine=engine,
            engine_options=dict(engine_options),
            sources=tuple(_sources(get("sources", ()))),
            track_tasks=_flag("jobreaper_track_tasks", get("track_tasks", True)),
            track_task_names=_globs("jobreaper_track_task_names", get("track_task_names", ("*",))),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            interval=_seconds(
                "jobreaper_interval", get("interval"), DEFAULT_INTERVAL, positive=True
            ),
            grace=_seconds("jobreaper_grace", get("grace"), DEFAULT_GRACE),
            max_age=None
            if max_age_raw is None
            else _seconds("jobreaper_max_age", max_age_raw, 0.0, positive=True),
            ping_timeout=_seconds(
                "jobreaper_ping_timeout", get("ping_timeout"), DEFAULT_PING_TIMEOUT, positive=True
            ),
            connect_timeout=_seconds(
                "jobreaper_connect_timeout",
                get("connect_timeout"),
                DEFAULT_CONNECT_TIMEOUT,
                positive=True,
            ),
            batch_size=_positive_int("jobreaper_batch_size", get("batch_size", DEFAULT_BATCH_SIZE)),
            dry_run=_flag("jobreaper_dry_run", get("dry_run", False)),
            strict=_flag("jobreaper_strict", get("strict", False)),
            create_tables=_flag("jobreaper_create_tables", get("create_tables", True)),
            policies=_policies(get("policies", {})),
            queue_cleanup=_choice(
                "jobreaper_queue_cleanup",
                get("queue_cleanup", "selective"),
                ("selective", "purge", "off"),
            ),  # type: ignore[arg-type]
            revoked_expires=_seconds(
                "jobreaper_revoked_expires",
                get("revoked_expires"),
                DEFAULT_REVOKED_EXPIRES,
                positive=True,
            ),
            late_write_window=_seconds(
                "jobreaper_late_write_window",
                get("late_write_window"),
                DEFAULT_LATE_WRITE_WINDOW,
            ),
            unacked_grace=_seconds(
                "jobreaper_unacked_grace", get("unacked_grace"), DEFAULT_UNACKED_GRACE
            ),
            amqp_max_deliveries=_positive_int(
                "jobreaper_amqp_max_deliveries",
                get("amqp_max_deliveries", DEFAULT_AMQP_MAX_DELIVERIES),
            ),
            webhooks=_urls("jobreaper_webhooks", get("webhooks", ())),
            webhook_timeout=_seconds(
                "jobreaper_webhook_timeout",
                get("webhook_timeout"),
                DEFAULT_WEBHOOK_TIMEOUT,
                positive=True,
            ),
            webhook_retries=_count(
                "jobreaper_webhook_retries", get("webhook_retries", DEFAULT_WEBHOOK_RETRIES)
            ),
            webhook_headers=_headers("jobreaper_webhook_headers", get("webhook_headers", {})),
            retention=_optional_seconds("jobreaper_retention", get("retention", DEFAULT_RETENTION)),
            prune_max_rows=_positive_int(
                "jobreaper_prune_max_rows", get("prune_max_rows", DEFAULT_PRUNE_MAX_ROWS)
            ),
        )
        if settings.enabled and settings.database_url is None and settings.engine is None:
            raise ConfigurationError(
                "jobreaper_database_url",
                "not set: give a SQLAlchemy URL (or jobreaper_engine), "
                "or set jobreaper_enabled = False",
            )
        return settings

    def policy_for(self, kind: str | None) -> Action:
        """Return the action configured for a job kind / task name (first matching glob wins)."""
        from fnmatch import fnmatchcase

        if kind is not None:
            for pattern, action in self.policies:
                if fnmatchcase(kind, pattern):
                    return action
        return "fail"

    def tracks(self, task_name: str) -> bool:
        """Whether tasks of this name are recorded in the tracked-jobs table."""
        from fnmatch import fnmatchcase

        return self.track_tasks and any(fnmatchcase(task_name, p) for p in self.track_task_names)


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(key, f"expected true or false, got {value!r}")


def _seconds(key: str, value: Any, default: float, *, positive: bool = False) -> float:
    if value is None:
        return default
    if isinstance(value, bool):
        raise ConfigurationError(key, f"expected a number of seconds, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigurationError(key, f"expected a number of seconds, got {value!r}") from None
    if not isinstance(value, (int, float, timedelta)):
        raise ConfigurationError(key, f"expected a number of seconds, got {value!r}")
    seconds = float(cast(Any, maybe_timedelta)(value).total_seconds())
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0 or (positive and seconds == 0):
        need = "a positive" if positive else "a non-negative"
        raise ConfigurationError(key, f"expected {need} number of seconds, got {value!r}")
    return seconds


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(key, f"expected a positive integer, got {value!r}")
    return value


def _optional_seconds(key: str, value: Any) -> float | None:
    return None if value is None else _seconds(key, value, 0.0, positive=True)


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(key, f"expected a non-negative integer, got {value!r}")
    return value


def _urls(key: str, value: Any) -> tuple[str, ...]:
    urls = (value,) if isinstance(value, str) else value
    if not isinstance(urls, (list, tuple)):
        raise ConfigurationError(key, f"expected a URL or a list of URLs, got {value!r}")
    for url in urls:
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise ConfigurationError(key, f"expected http:// or https:// URLs, got {url!r}")
    return tuple(urls)


def _headers(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigurationError(
            key, f"expected a mapping of header names to strings, got {value!r}"
        )
    return dict(value)


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigurationError(key, f"expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _globs(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(key, "expected a list of task-name globs")
    return tuple(value)


def _policies(value: Any) -> tuple[tuple[str, Action], ...]:
    key = "jobreaper_policies"
    if not isinstance(value, Mapping):
        raise ConfigurationError(key, "expected a mapping of glob -> 'fail' or 'ignore'")
    out: list[tuple[str, Action]] = []
    for pattern, action in value.items():
        if not isinstance(pattern, str):
            raise ConfigurationError(key, f"glob {pattern!r} is not a string")
        if action not in ACTIONS:
            raise ConfigurationError(
                f"{key}[{pattern!r}]", f"expected 'fail' or 'ignore', got {action!r}"
            )
        out.append((pattern, action))
    return tuple(out)


def _sources(value: Any) -> list[SourceSpec]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ConfigurationError("jobreaper_sources", "expected a list of table mappings")
    return [_source(f"jobreaper_sources[{i}]", raw) for i, raw in enumerate(value)]


def _source(key: str, raw: Any) -> SourceSpec:
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
    name = raw.get("name") or _table_label(table)
    prune_after, prune_statuses = _prune_of(key, raw, columns, tuple(stale))
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


def _prune_of(
    key: str, raw: Mapping[str, Any], columns: Mapping[str, str | None], stale: tuple[str, ...]
) -> tuple[float | None, tuple[str, ...]]:
    """A source's opt-in to pruning: ``prune_after`` seconds, for ``prune_statuses`` rows."""
    after = _optional_seconds(f"{key}.prune_after", raw.get("prune_after"))
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


def _table_label(table: Any) -> str:
    if isinstance(table, str):
        return table.rsplit(":", 1)[-1]
    for attr in ("__tablename__", "name"):
        label = getattr(table, attr, None)
        if isinstance(label, str):
            return label
    return repr(table)
