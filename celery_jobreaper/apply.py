"""Settle decided jobs: compare-and-set updates plus ledger events, one transaction a batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import String, Text, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from .database import Database
from .planner import Decision
from .schema import JobReaperTables
from .sources.base import SettleTarget

logger = logging.getLogger(__name__)

SETTLED = "settled"


def settle_batch(
    conn: Connection,
    db: Database,
    tables: JobReaperTables,
    target: SettleTarget,
    decisions: Sequence[Decision],
    *,
    now: datetime,
    run_id: int | None,
) -> list[Decision]:
    """Fail the jobs of *decisions* that are still as the planner saw them; return those.

    Call inside a transaction. Rows are locked first (``FOR UPDATE SKIP LOCKED`` where the
    database has it; SQLite's ``BEGIN IMMEDIATE`` serialises writers), re-checked against the
    stale predicate and the owner the planner judged, then updated together with one ledger
    event each. A row another reaper holds or has already settled is skipped, so any number of
    concurrent reapers settle each job exactly once.
    """
    if not decisions:
        return []
    by_id = {d.candidate.job_id: d for d in decisions}
    lock = select(target.id, *target.guards.values()).where(
        target.id.in_(list(by_id)), target.status.in_(target.stale_statuses)
    )
    if db.skip_locked:
        lock = lock.with_for_update(skip_locked=True)
    confirmed: list[Decision] = []
    for row in conn.execute(lock):
        decision = by_id.get(row[0])
        if decision is None:
            continue
        observed = decision.candidate
        if all(
            row._mapping[col.name] == getattr(observed, role) for role, col in target.guards.items()
        ):
            confirmed.append(decision)
    if not confirmed:
        return []
    _update(conn, db, target, confirmed, now)
    record_events(conn, tables, confirmed, now=now, run_id=run_id, new_status=target.failed_status)
    return confirmed


def _update(
    conn: Connection, db: Database, target: SettleTarget, confirmed: list[Decision], now: datetime
) -> None:
    values: dict[str, Any] = {target.status.name: target.failed_status, **target.extra_values}
    if target.completed_at is not None:
        values[target.completed_at.name] = now
    errors = [_fit(target, d.error or d.reason) for d in confirmed]
    ids = [d.candidate.job_id for d in confirmed]
    where = target.status.in_(target.stale_statuses)
    if db.engine.dialect.name == "postgresql":
        # One set-based statement: UPDATE … FROM unnest(:ids, :errors) AS v(id, error).
        v = (
            func.unnest(
                bindparam("jr_ids", ids, type_=ARRAY(target.id.type)),
                bindparam("jr_errors", errors, type_=ARRAY(Text())),
            )
            .table_valued("id", "error")
            .render_derived(name="jr_v")
        )
        if target.error is not None:
            values[target.error.name] = v.c.error
        conn.execute(update(target.table).where(target.id == v.c.id, where).values(**values))
        return
    if target.error is not None:
        values[target.error.name] = bindparam("jr_error")
    # executemany cannot expand IN lists; the rows are locked and confirmed anyway.
    still_stale = or_(*(target.status == s for s in target.stale_statuses))
    stmt = update(target.table).where(target.id == bindparam("jr_id"), still_stale).values(**values)
    conn.execute(stmt, [{"jr_id": i, "jr_error": e} for i, e in zip(ids, errors, strict=True)])


def _fit(target: SettleTarget, text: str) -> str:
    """Cut the error text to the error column's length, if it has one."""
    if target.error is None:
        return text
    length = getattr(target.error.type, "length", None)
    if isinstance(target.error.type, String) and length and len(text) > length:
        return text[: max(0, length - 1)] + "…"
    return text


def record_events(
    conn: Connection,
    tables: JobReaperTables,
    decisions: Sequence[Decision],
    *,
    now: datetime,
    run_id: int | None,
    new_status: str | None,
    action: str = SETTLED,
) -> None:
    """Write one ledger event per decision."""
    conn.execute(
        insert(tables.events),
        [
            {
                "run_id": run_id,
                "at": now,
                "source": d.candidate.source,
                "job_id": str(d.candidate.job_id),
                "task_id": d.candidate.task_id,
                "kind": d.candidate.kind,
                "previous_status": d.candidate.status,
                "new_status": new_status,
                "action": action,
                "reason": d.error or d.reason,
                "owner": d.candidate.owner,
            }
            for d in decisions
        ],
    )
