"""Late results: a fenced finish that changed nothing (the job was settled while it ran)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.engine import Connection

from .. import ledger, signals
from ..clock import utcnow
from ..incarnation import Incarnation
from ..schema import JobReaperTables
from ..vocabulary import LATE_RESULT, RUNNING

logger = logging.getLogger("celery_jobreaper.tracking")

__all__ = ["LATE_RESULT", "record_late", "report_late"]


def record_late(
    conn: Connection, tables: JobReaperTables, me: Incarnation, late: list[tuple[str, str]]
) -> None:
    """One ``late_result`` ledger event per late finish (in the flush's transaction)."""
    # The job was settled (or taken over) while we ran: keep what the reaper wrote.
    events = [
        ledger.Event(
            action=LATE_RESULT,
            source=tables.jobs.name,
            job_id=task_id,
            reason=f"late result {status!r} from {me.node} after the job was settled; not applied",
            task_id=task_id,
            previous_status=RUNNING,
            new_status=status,
            owner=me.node,
        )
        for task_id, status in late
    ]
    ledger.write(conn, tables, events, now=utcnow(), run_id=None)


def report_late(
    sender: Any, node: str, late: list[tuple[str, str]], *, source: str = "jobreaper_jobs"
) -> None:
    """After the commit: log each late result and send :data:`signals.late_result`."""
    for task_id, status in late:
        logger.warning(
            "jobreaper: late result for task %s: %s finished it as %s after it had been "
            "settled; the settled row was kept and the late result recorded in the ledger",
            task_id,
            node,
            status,
        )
        signals.late_result.send(
            sender=sender, task_id=task_id, status=status, node=node, source=source, job_id=task_id
        )
