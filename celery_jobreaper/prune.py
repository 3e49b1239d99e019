"""Deleting what is finished and old: tracked jobs, runs, events, and opted-in user rows.

Each target is walked once in primary-key order (keyset pagination, so no batch rescans what
an earlier one passed). A batch reads up to ``batch`` keys that match, then deletes exactly those
keys *that still match* (the predicate is checked again in the ``DELETE``, so a row that changed
in between — a job that started again — stays), in a transaction of its own: locks are held for
one small batch, never for the whole prune. A call stops after ``max_rows`` deletions and says
so; the next call goes on from the start, finding only what is left.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, delete, select
from sqlalchemy.engine import Connection

from .clock import db_utcnow
from .database import Database
from .schema import JobReaperTables, tables
from .settings import Settings
from .sources import resolve_table
from .sources.user_table import UserTableSource
from .textsafe import safe
from .vocabulary import FAILED, REVOKED, SETTLED, SUCCEEDED

logger = logging.getLogger(__name__)

#: statuses of jobreaper_jobs a prune may delete (never running or retry)
FINISHED: tuple[str, ...] = (SUCCEEDED, FAILED, REVOKED)


@dataclasses.dataclass(frozen=True)
class PruneTarget:
    """One table and which of its rows are finished and older than a cut-off."""

    name: str
    table: Table
    pk: Any  #: the single-column primary key (or unique id) walked in order
    matches: Callable[[datetime], ColumnElement[bool]]  #: the rows to delete, given the cut-off
    keep_for: float  #: seconds a finished row is kept


@dataclasses.dataclass
class PruneResult:
    """What a prune deleted (or, in a dry run, would delete) per target."""

    dry_run: bool
    deleted: dict[str, int] = dataclasses.field(default_factory=dict)
    #: True when ``max_rows`` stopped it: more rows are due
    partial: bool = False
    duration: float = 0.0  #: seconds

    @property
    def total(self) -> int:
        """Rows deleted (or that would be) over every target."""
        return sum(self.deleted.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {
            "dry_run": self.dry_run,
            "deleted": dict(self.deleted),
            "total": self.total,
            "partial": self.partial,
            "duration": round(self.duration, 6),
        }


def own_targets(
    tbls: JobReaperTables, keep_for: float, *, keep_settled_for: float = 0.0
) -> list[PruneTarget]:
    """jobreaper's own tables: finished tracked jobs, runs, ledger events, late-write marks.

    A ``settled`` event is kept at least *keep_settled_for* seconds
    (``jobreaper_late_write_window``): late writes to its row are found through it.
    """
    jobs, runs, events, marks = tbls.jobs, tbls.runs, tbls.events, tbls.late_writes
    longer = timedelta(seconds=max(0.0, keep_settled_for - keep_for))

    def old_event(cut: datetime) -> ColumnElement[bool]:
        return (events.c.at < cut) & ((events.c.action != SETTLED) | (events.c.at < cut - longer))

    return [
        PruneTarget(
            jobs.name,
            jobs,
            jobs.c.task_id,
            lambda cut: jobs.c.status.in_(FINISHED) & (jobs.c.completed_at < cut),
            keep_for,
        ),
        # A run that never finished (its worker died mid-run) goes by its start.
        PruneTarget(runs.name, runs, runs.c.id, lambda cut: runs.c.started_at < cut, keep_for),
        PruneTarget(events.name, events, events.c.id, old_event, keep_for),
        # A late write's mark is kept as long as a settled event (no second recording).
        PruneTarget(
            marks.name,
            marks,
            marks.c.event_id,
            lambda cut: marks.c.detected_at < cut - longer,
            keep_for,
        ),
    ]


def user_target(source: UserTableSource) -> PruneTarget | None:
    """An opted-in user table (``prune_after`` and ``prune_statuses`` in its source mapping)."""
    spec = source.spec
    if spec.prune_after is None:
        return None
    status, completed = source.cols["status"], source.cols["completed_at"]
    statuses = spec.prune_statuses
    return PruneTarget(
        source.name,
        source.table,
        source.cols["id"],
        lambda cut: status.in_(statuses) & (completed < cut),
        spec.prune_after,
    )


class Pruner:
    """Deletes finished rows older than their retention, in short batches."""

    def __init__(
        self, db: Database, targets: Sequence[PruneTarget], *, batch: int, max_rows: int
    ) -> None:
        self.db = db
        self.targets = list(targets)
        self.batch = batch  #: rows per transaction
        self.max_rows = max_rows  #: rows per call, over every target

    def run(self, *, dry_run: bool = False) -> PruneResult:
        """One pass over every target (cut-offs on the database's clock)."""
        began = time.monotonic()
        result = PruneResult(dry_run=dry_run)
        with self.db.connect() as conn:
            now = db_utcnow(conn)
        budget = self.max_rows
        for target in self.targets:
            cut = now - timedelta(seconds=target.keep_for)
            done, stopped = self._prune(target, cut, budget, dry_run)
            result.deleted[target.name] = done
            budget -= done
            if stopped:
                result.partial = True
                break
        result.duration = time.monotonic() - began
        if result.total:
            logger.info(
                "jobreaper: %s %d finished rows older than their retention (%s) in %.3f s%s",
                "[dry run] would prune" if dry_run else "Pruned",
                result.total,
                ", ".join(f"{safe(k)} {v}" for k, v in result.deleted.items() if v),
                result.duration,
                "; more are due (max rows per prune reached)" if result.partial else "",
            )
        return result

    def _prune(
        self, target: PruneTarget, cut: datetime, budget: int, dry_run: bool
    ) -> tuple[int, bool]:
        """Rows deleted from *target*, and whether the budget stopped it."""
        done = 0
        after: Any = None
        while True:
            if done >= budget:
                return done, True
            limit = min(self.batch, budget - done)
            with self.db.connect() as conn, conn.begin():
                keys = self._keys(conn, target, cut, after, limit)
                if not keys:
                    return done, False
                after = keys[-1]
                if dry_run:
                    done += len(keys)
                else:
                    gone = conn.execute(
                        delete(target.table).where(target.pk.in_(keys) & target.matches(cut))
                    )
                    done += max(gone.rowcount, 0)
            if len(keys) < limit:
                return done, False

    @staticmethod
    def _keys(
        conn: Connection, target: PruneTarget, cut: datetime, after: Any, limit: int
    ) -> list[Any]:
        query = select(target.pk).where(target.matches(cut)).order_by(target.pk).limit(limit)
        if after is not None:
            query = query.where(target.pk > after)
        return list(conn.execute(query).scalars())


def targets_for(
    settings: Settings, db: Database, older_than: float | None = None
) -> list[PruneTarget]:
    """What a prune deletes under *settings*: jobreaper's own tables past
    ``jobreaper_retention`` (*older_than* overrides it; both ``None``: not pruned), and user
    tables whose source sets ``prune_after`` (reflected now)."""
    keep = settings.retention if older_than is None else older_than
    targets = (
        []
        if keep is None
        else own_targets(tables, keep, keep_settled_for=settings.late_write_window)
    )
    with db.connect() as conn:
        for spec in settings.sources:
            if spec.prune_after is not None:
                target = user_target(UserTableSource(spec, resolve_table(spec, conn)))
                if target is not None:
                    targets.append(target)
    return targets
