"""The ``jobreaper_*`` settings: defaults, validation, and the frozen :class:`Settings`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigurationError
from .sourcespec import COLUMN_ROLES, REQUIRED_ROLES, SourceSpec, parse_sources
from .values import (
    choice,
    count,
    flag,
    flag_or_auto,
    globs,
    headers,
    optional_seconds,
    positive_int,
    seconds,
    urls,
)

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["COLUMN_ROLES", "REQUIRED_ROLES", "Settings", "SourceSpec"]

#: Seconds between two heartbeats of a worker's incarnation row.
DEFAULT_HEARTBEAT_INTERVAL = 5.0
#: Seconds without a heartbeat after which a worker becomes a suspect (it is then pinged once).
DEFAULT_HEARTBEAT_TIMEOUT = 20.0
#: The maintenance lease lasts this many heartbeat intervals unless ``jobreaper_lease_timeout``
#: says otherwise (the leader renews it on every heartbeat: two may be missed).
LEASE_HEARTBEATS = 3
#: Seconds between two periodic reaps (by the cluster's maintenance leader only, so they may be
#: frequent: a dead worker's job is settled about ``heartbeat_timeout`` + half of this after).
DEFAULT_INTERVAL = 10.0
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
#: seconds between two prunes by the worker that leads the cluster's maintenance
DEFAULT_PRUNE_INTERVAL = 3600.0
#: Engine options used when jobreaper creates its own engine (Celery's own choice).
DEFAULT_ENGINE_OPTIONS: Mapping[str, Any] = {"pool_pre_ping": True, "pool_recycle": 3600}

Action = Literal["fail", "ignore"]
ACTIONS: tuple[str, ...] = ("fail", "ignore")


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
    #: result backend rows (``STARTED``/``RETRY``) as a source, Celery's ``db+…`` or
    #: django-celery-results': ``"auto"`` (when the app's result backend is one of these in
    #: jobreaper's database and ``task_track_started`` is on), ``True`` or ``False``
    result_rows: bool | Literal["auto"] = "auto"
    track_task_names: tuple[str, ...] = ("*",)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    interval: float = DEFAULT_INTERVAL
    #: seconds the maintenance lease lasts without renewal (see :mod:`celery_jobreaper.lease`)
    lease_timeout: float = LEASE_HEARTBEATS * DEFAULT_HEARTBEAT_INTERVAL
    #: whether this worker may lead the cluster's maintenance (periodic reap, broker sweep)
    lead: bool = True
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
    prune_interval: float | None = DEFAULT_PRUNE_INTERVAL
    metrics: bool = False
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"

    def summary(self) -> dict[str, Any]:
        """What ``inspect jobreaper`` shows of these settings (durations in seconds; no URL,
        engine or webhook address, which may hold secrets)."""
        return {
            "sources": [spec.name for spec in self.sources],
            "track_tasks": self.track_tasks,
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
            "interval": self.interval,
            "max_age": self.max_age,
            "queue_cleanup": self.queue_cleanup,
            "dry_run": self.dry_run,
            "strict": self.strict,
            "webhooks": len(self.webhooks),
            "retention": self.retention,
        }

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
        heartbeat_interval = seconds(
            "jobreaper_heartbeat_interval",
            get("heartbeat_interval"),
            DEFAULT_HEARTBEAT_INTERVAL,
            positive=True,
        )
        heartbeat_timeout = seconds(
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
        lease_timeout = seconds(
            "jobreaper_lease_timeout",
            get("lease_timeout"),
            LEASE_HEARTBEATS * heartbeat_interval,
            positive=True,
        )
        if lease_timeout <= heartbeat_interval:
            raise ConfigurationError(
                "jobreaper_lease_timeout",
                f"must be greater than jobreaper_heartbeat_interval ({heartbeat_interval:g} s: "
                f"the leader renews the lease on every heartbeat), got {lease_timeout:g} s",
            )
        max_age_raw = get("max_age")
        settings = cls(
            enabled=flag("jobreaper_enabled", get("enabled", True)),
            database_url=database_url,
            engine=engine,
            engine_options=dict(engine_options),
            sources=tuple(parse_sources(get("sources", ()))),
            track_tasks=flag("jobreaper_track_tasks", get("track_tasks", True)),
            result_rows=flag_or_auto("jobreaper_result_rows", get("result_rows", "auto")),
            track_task_names=globs("jobreaper_track_task_names", get("track_task_names", ("*",))),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            interval=seconds(
                "jobreaper_interval", get("interval"), DEFAULT_INTERVAL, positive=True
            ),
            lease_timeout=lease_timeout,
            lead=flag("jobreaper_lead", get("lead", True)),
            grace=seconds("jobreaper_grace", get("grace"), DEFAULT_GRACE),
            max_age=None
            if max_age_raw is None
            else seconds("jobreaper_max_age", max_age_raw, 0.0, positive=True),
            ping_timeout=seconds(
                "jobreaper_ping_timeout", get("ping_timeout"), DEFAULT_PING_TIMEOUT, positive=True
            ),
            connect_timeout=seconds(
                "jobreaper_connect_timeout",
                get("connect_timeout"),
                DEFAULT_CONNECT_TIMEOUT,
                positive=True,
            ),
            batch_size=positive_int("jobreaper_batch_size", get("batch_size", DEFAULT_BATCH_SIZE)),
            dry_run=flag("jobreaper_dry_run", get("dry_run", False)),
            strict=flag("jobreaper_strict", get("strict", False)),
            create_tables=flag("jobreaper_create_tables", get("create_tables", True)),
            policies=_policies(get("policies", {})),
            queue_cleanup=choice(
                "jobreaper_queue_cleanup",
                get("queue_cleanup", "selective"),
                ("selective", "purge", "off"),
            ),  # type: ignore[arg-type]
            revoked_expires=seconds(
                "jobreaper_revoked_expires",
                get("revoked_expires"),
                DEFAULT_REVOKED_EXPIRES,
                positive=True,
            ),
            late_write_window=seconds(
                "jobreaper_late_write_window",
                get("late_write_window"),
                DEFAULT_LATE_WRITE_WINDOW,
            ),
            unacked_grace=seconds(
                "jobreaper_unacked_grace", get("unacked_grace"), DEFAULT_UNACKED_GRACE
            ),
            amqp_max_deliveries=positive_int(
                "jobreaper_amqp_max_deliveries",
                get("amqp_max_deliveries", DEFAULT_AMQP_MAX_DELIVERIES),
            ),
            webhooks=urls("jobreaper_webhooks", get("webhooks", ())),
            webhook_timeout=seconds(
                "jobreaper_webhook_timeout",
                get("webhook_timeout"),
                DEFAULT_WEBHOOK_TIMEOUT,
                positive=True,
            ),
            webhook_retries=count(
                "jobreaper_webhook_retries", get("webhook_retries", DEFAULT_WEBHOOK_RETRIES)
            ),
            webhook_headers=headers("jobreaper_webhook_headers", get("webhook_headers", {})),
            retention=optional_seconds("jobreaper_retention", get("retention", DEFAULT_RETENTION)),
            prune_max_rows=positive_int(
                "jobreaper_prune_max_rows", get("prune_max_rows", DEFAULT_PRUNE_MAX_ROWS)
            ),
            prune_interval=optional_seconds(
                "jobreaper_prune_interval", get("prune_interval", DEFAULT_PRUNE_INTERVAL)
            ),
            metrics=flag("jobreaper_metrics", get("metrics", False)),
            metrics_addr=get("metrics_addr", "0.0.0.0"),
            metrics_port=(
                None
                if get("metrics_port") is None
                else positive_int("jobreaper_metrics_port", get("metrics_port"))
            ),
        )
        if not isinstance(settings.metrics_addr, str) or not settings.metrics_addr:
            raise ConfigurationError(
                "jobreaper_metrics_addr", f"expected an address, got {settings.metrics_addr!r}"
            )
        if settings.metrics_port is not None and not settings.metrics:
            raise ConfigurationError(
                "jobreaper_metrics_port", "set, but jobreaper_metrics is off: set it to True"
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
