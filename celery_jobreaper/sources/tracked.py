"""jobreaper's own tracked-jobs table, fed by task signals; the most precise ownership."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..schema import JobReaperTables
from ..vocabulary import FAILED, RUNNING
from .base import Candidate, SettleTarget, keyset_batch


class TrackedJobsSource:
    """Rows of ``jobreaper_jobs`` still ``running``; their owner is an incarnation."""

    name = "jobreaper_jobs"
    has_owner = True
    has_task_id = True

    def __init__(self, tables: JobReaperTables) -> None:
        t = tables.jobs
        self.table = t
        self.target = SettleTarget(
            table=t,
            id=t.c.task_id,
            status=t.c.status,
            stale_statuses=(RUNNING,),
            failed_status=FAILED,
            completed_at=t.c.completed_at,
            error=t.c.error,
            # a retry of the same task id starts a new run: started_at tells them apart
            guards={"incarnation_id": t.c.incarnation_id, "started_at": t.c.started_at},
            extra_values={"fence": None, "times_reaped": t.c.times_reaped + 1},
        )

    def owners(self, conn: Connection) -> tuple[set[str], set[str]]:
        """Incarnations owning running tracked jobs (no node names needed)."""
        t = self.table
        rows = conn.execute(select(t.c.incarnation_id).where(t.c.status == RUNNING).distinct())
        return {r[0] for r in rows if r[0]}, set()

    def has_ownerless_stale(self, conn: Connection) -> bool:
        """Whether a running tracked job has neither incarnation nor node (not written so)."""
        t = self.table
        probe = (
            select(t.c.task_id)
            .where(t.c.status == RUNNING, t.c.incarnation_id.is_(None), t.c.node.is_(None))
            .limit(1)
        )
        return conn.execute(probe).first() is not None

    def stale_summary(self, conn: Connection) -> tuple[int, datetime | None]:
        """How many tracked jobs are running, and the oldest start among them."""
        t = self.table
        count, oldest = conn.execute(
            select(func.count(), func.min(t.c.started_at)).where(t.c.status == RUNNING)
        ).one()
        return int(count), oldest

    def batch(self, conn: Connection, after: Any, limit: int) -> list[Candidate]:
        """Running tracked jobs, by task id."""
        t = self.table
        cols = [
            t.c.task_id,
            t.c.status,
            t.c.task_name,
            t.c.started_at,
            t.c.node,
            t.c.incarnation_id,
        ]
        rows = keyset_batch(
            conn,
            id_col=t.c.task_id,
            columns=cols,
            where=t.c.status == RUNNING,
            after=after,
            limit=limit,
        )
        return [
            Candidate(
                self.name,
                r.task_id,
                r.status,
                r.task_name,
                r.started_at,
                r.node,
                r.incarnation_id,
                r.task_id,
            )
            for r in rows
        ]
