"""The ledger: one event per thing jobreaper did (a job settled, a message removed …)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, String, Table, insert
from sqlalchemy.engine import Connection

from .pgarrays import insert_unnest
from .schema import JobReaperTables
from .textsafe import safe

logger = logging.getLogger(__name__)

#: Appended to a text cut to its column's length.
CUT_MARK = "…"


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One row of ``jobreaper_events``, before the run's id and time are added."""

    action: str  #: one of :data:`celery_jobreaper.vocabulary.LEDGER_ACTIONS`
    source: str  #: the job source's name (``"broker"`` for the sweep's events)
    job_id: str  #: the job's id (for the sweep: the task id, or the queues purged)
    reason: str
    task_id: str | None = None
    kind: str | None = None
    previous_status: str | None = None
    new_status: str | None = None
    owner: str | None = None


def write(
    conn: Connection,
    tables: JobReaperTables,
    events: Sequence[Event],
    *,
    now: datetime,
    run_id: int | None,
) -> None:
    """Write *events* (in the caller's transaction); one statement on PostgreSQL."""
    if not events:
        return
    fixed = {"run_id": run_id, "at": now}
    per_event: dict[str, list[Any]] = {
        "job_id": [e.job_id for e in events],
        "source": [e.source for e in events],
        "task_id": [e.task_id for e in events],
        "kind": [e.kind for e in events],
        "previous_status": [e.previous_status for e in events],
        "new_status": [e.new_status for e in events],
        "action": [e.action for e in events],
        "reason": [e.reason for e in events],
        "owner": [e.owner for e in events],
    }
    _fit_ledger(tables.events, per_event)
    if conn.dialect.name == "postgresql" and len(events) > 1:
        insert_unnest(conn, tables.events, fixed, per_event)
        return
    conn.execute(
        insert(tables.events),
        [
            {**fixed, **{name: values[i] for name, values in per_event.items()}}
            for i in range(len(events))
        ],
    )


def ledger_cut_note(name: str, whole: str) -> str:
    """Appended to an event's reason when *name* was cut to fit its column (the whole value).

    :mod:`celery_jobreaper.bulk_text` builds the same text in SQL.
    """
    return f" [{name} cut to fit the ledger; whole: {whole}]"


def ledger_length(column: ColumnElement[Any]) -> int | None:
    """The length limit of a ledger column, if it is a ``String`` with one."""
    length = getattr(column.type, "length", None)
    return int(length) if isinstance(column.type, String) and length else None


def _fit_ledger(table: Table, per_event: dict[str, list[Any]]) -> None:
    """Cut values longer than their ledger column (with :data:`CUT_MARK`), in place.

    A task id or job id longer than the column would otherwise fail the insert (PostgreSQL,
    strict MySQL) and with it the whole batch, every run. The whole value goes into the
    event's reason (a ``Text``), so nothing is lost.
    """
    reasons = per_event["reason"]
    for name, values in per_event.items():
        length = ledger_length(table.c[name])
        if length is None:
            continue
        for i, value in enumerate(values):
            if isinstance(value, str) and len(value) > length:
                values[i] = value[: max(0, length - 1)] + CUT_MARK
                reasons[i] = (reasons[i] or "") + ledger_cut_note(name, value)
                logger.warning(
                    "jobreaper: ledger %s of %d characters cut to its column's %d (the whole "
                    "value is in the event's reason): %s",
                    name,
                    len(value),
                    length,
                    safe(value[:80] + ("…" if len(value) > 80 else "")),
                )
