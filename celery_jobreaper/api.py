"""Reaping and pruning from any process (a web app's startup, a cron job, the CLI)."""

from __future__ import annotations

from typing import Any

from .database import Database
from .extras import check_broker_transport
from .metrics import metrics_for
from .prune import Pruner, PruneResult, targets_for
from .reaper import Reaper
from .report import Report
from .schema import tables
from .settings import Settings
from .sweep import BrokerSweep, worker_queues
from .vocabulary import MANUAL
from .webhooks import webhooks_for


def reap(app: Any, *, dry_run: bool = False, trigger: str = MANUAL, **overrides: Any) -> Report:
    """Settle stale jobs once, from this process, and return the report.

    This process is not a worker: jobs are settled only when their owner is provably dead
    (or, for tables without owners, when no live worker exists or they exceed
    ``jobreaper_max_age``). *overrides* take precedence over ``app.conf`` (e.g. ``max_age=3600``).
    """
    settings = Settings.from_app(app, **overrides)
    check_broker_transport(app)
    db = Database.from_settings(settings)
    webhooks = webhooks_for(settings)
    try:
        sweep = BrokerSweep(app, settings, db, tables, worker_queues(app))
        reaper = Reaper(
            app, settings, db, sweep=sweep, webhooks=webhooks, metrics=metrics_for(settings)
        )
        return reaper.run(trigger, dry_run=dry_run)
    finally:
        db.dispose()
        if webhooks is not None:
            webhooks.close()  # a one-shot process: deliver before returning


def prune(app: Any, *, dry_run: bool = False, older_than: float | None = None) -> PruneResult:
    """Delete finished rows older than their retention, in short batches; return the counts.

    jobreaper's own tables keep ``jobreaper_retention`` seconds (*older_than* overrides it; both
    ``None``: they are not pruned); user tables only when their source sets ``prune_after``.
    At most ``jobreaper_prune_max_rows`` rows per call (``partial`` says more are due).
    """
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    try:
        targets = targets_for(settings, db, older_than)
        pruner = Pruner(db, targets, batch=settings.batch_size, max_rows=settings.prune_max_rows)
        return pruner.run(dry_run=dry_run)
    finally:
        db.dispose()
