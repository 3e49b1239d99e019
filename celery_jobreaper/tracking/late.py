"""Late results: a fenced finish that changed nothing (the job was settled while it ran)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.engine import Connection

from .. import signals
from ..apply import record_events
from ..clock import utcnow
from ..liveness import Incarnation
from ..planner import Decision
from ..schema import JobReaperTables
from ..sources.base import Candidate
from ..sources.tracked import RUNNING

logger = logging.getLogger("celery_jobreaper.tracking")

LATE_RESULT = "late_result"


def record_late(
    conn: Connection, tables: JobReaperTables, me: Incarnation, late: list[tuple[str, str]]
) -> None:
    """One ``late_result`` ledger event per late finish (in the flush's transaction)."""
    by_status: dict[str, list[Decision]] = {}
    for task_id, status in late:
        # The job was settled (or taken over) while we ran: keep what the reaper wrote.
        by_status.setdefault(status, []).append(
            Decision(
                Candidate(tables.jobs.name, task_id, RUNNING, None, None, me.node, me.id, task_id),
                "leave",
                f"late result {status!r} from {me.node} after the job was settled; not applied",
            )
        )
    now = utcnow()
    for status, decisions in by_status.items():
        record_events(
            conn,
            tables,
            decisions,
            now=now,
            run_id=None,
            new_status=status,
            action=LATE_RESULT,
        )


def report_late(sender: Any, node: str, late: list[tuple[str, str]]) -> None:
    """After the commit: log each late result and send :data:`signals.late_result`."""
    for task_id, status in late:
        logger.warning(
            "jobreaper: late result for task %s: %s finished it as %s after it had been "
            "settled; the settled row was kept and the late result recorded in the ledger",
            task_id,
            node,
            status,
        )
        signals.late_result.send(sender=sender, task_id=task_id, status=status, node=node)
