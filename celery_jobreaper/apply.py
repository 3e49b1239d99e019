"""Settle decided jobs: compare-and-set updates plus ledger events, one transaction a batch."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Date,
    DateTime,
    String,
    Text,
    any_,
    bindparam,
    func,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.engine import Connection

from . import ledger
from .database import Database
from .ledger import CUT_MARK
from .pgarrays import Array, send_arrays_in_binary
from .planner import Decision
from .revoked import record_settled
from .schema import JobReaperTables
from .settings import DEFAULT_REVOKED_EXPIRES
from .sources.base import SettleTarget
from .textsafe import safe
from .timezones import localize
from .vocabulary import SETTLED

logger = logging.getLogger(__name__)


def settle_batch(
    conn: Connection,
    db: Database,
    tables: JobReaperTables,
    target: SettleTarget,
    decisions: Sequence[Decision],
    *,
    now: datetime,
    run_id: int | None,
    revoked_expires: float = DEFAULT_REVOKED_EXPIRES,
) -> list[Decision]:
    """Fail the jobs of *decisions* that are still as the planner saw them; return those.

    Call inside a transaction. Rows are locked first (``FOR UPDATE SKIP LOCKED`` where the
    database has it; SQLite's ``BEGIN IMMEDIATE`` serialises writers) and re-checked: still
    in the status the planner saw, with the owner it judged and the ``started_at`` it read (a
    job that finished and started again since is a new run). The UPDATE then compares and sets
    on all of that again, so a database without row locks is exact too, and only the rows it
    really changed (``RETURNING`` on PostgreSQL, each statement's rowcount elsewhere) get a
    ledger event and are returned. Any number of concurrent reapers settle each job once. The
    task ids of the settled jobs are revoked (``jobreaper_revoked``, for *revoked_expires*
    seconds at most) in the same transaction.

    On PostgreSQL each step is one statement whatever the batch size: the ids, error texts and
    compared values travel as arrays (``= ANY(:ids)``, ``unnest(…)``), in binary with psycopg 3.
    """
    if not decisions:
        return []
    confirmed = _lock_and_check(conn, db, target, decisions)
    if not confirmed:
        return []
    done = _update(conn, target, confirmed, now)
    ledger.write(
        conn,
        tables,
        [event_of(d, action=SETTLED, new_status=target.failed_status) for d in done],
        now=now,
        run_id=run_id,
    )
    record_settled(
        conn, tables, [d.candidate.task_id for d in done], expires=revoked_expires, now=now
    )
    if len(done) < len(decisions):
        settled = {d.candidate.job_id for d in done}
        moved = [d.candidate.job_id for d in decisions if d.candidate.job_id not in settled]
        logger.debug(
            "jobreaper: left %d job(s) of %s alone that changed since they were judged "
            "(finished, started again, or settled by another reaper): %s%s",
            len(moved),
            safe(target.table.name),
            ", ".join(safe(i) for i in moved[:10]),
            " …" if len(moved) > 10 else "",
        )
    return done


@dataclasses.dataclass(frozen=True, slots=True)
class _Checked:
    """A decision whose row still matched, with the stored values to compare-and-set on."""

    decision: Decision
    status: Any
    guards: tuple[Any, ...]  #: per guard of the target, as :func:`_stored` reads it


def _stored(conn: Connection, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """*column* as stored, for comparing with itself in a later statement.

    SQLite keeps date/time values as text that SQLAlchemy parses on the way out and formats
    on the way in, possibly differently (``…T12:00:00`` read, ``… 12:00:00.000000`` written):
    there the text itself is compared.
    """
    if conn.dialect.name == "sqlite" and isinstance(column.type, (DateTime, Date)):
        return type_coerce(column, String())
    return column


def _lock_and_check(
    conn: Connection, db: Database, target: SettleTarget, decisions: Sequence[Decision]
) -> list[_Checked]:
    """Lock the rows still stale; keep the decisions whose status and guards are unchanged."""
    by_id = {d.candidate.job_id: d for d in decisions}
    if _is_postgresql(conn):
        send_arrays_in_binary(conn)
        ids = bindparam("jr_ids", list(by_id), type_=Array(target.id.type))
        match: ColumnElement[bool] = target.id == any_(ids)
    else:
        match = target.id.in_(list(by_id))
    guards = list(target.guards.items())
    stored = [_stored(conn, col) for _, col in guards]
    # In id order: concurrent reapers without row locks then update rows in one order too.
    lock = (
        select(target.id, target.status, *(col for _, col in guards), *stored)
        .where(match, target.status.in_(target.stale_statuses))
        .order_by(target.id)
    )
    if db.skip_locked:
        lock = lock.with_for_update(skip_locked=True)
    n = len(guards)
    confirmed: list[_Checked] = []
    for row in conn.execute(lock).all():
        decision = by_id.get(row[0])
        if decision is None:
            continue
        observed = decision.candidate
        if row[1] != observed.status:
            continue
        if all(
            _as_read(role, row[2 + i], target) == getattr(observed, role)
            for i, (role, _) in enumerate(guards)
        ):
            confirmed.append(_Checked(decision, row[1], tuple(row[2 + n : 2 + 2 * n])))
    return confirmed


def _as_read(role: str, value: Any, target: SettleTarget) -> Any:
    """A guard value as the source put it on the candidate (``started_at`` in its zone, the
    task id as text)."""
    if role == "started_at":
        return localize(value, target.zone)
    if role == "task_id" and value is not None:
        return str(value)
    return value


def _update(
    conn: Connection, target: SettleTarget, confirmed: list[_Checked], now: datetime
) -> list[Decision]:
    """Compare-and-set every confirmed row; return the decisions whose row really changed."""
    values: dict[str, Any] = {target.status.name: target.failed_status, **target.extra_values}
    if target.completed_at is not None:
        values[target.completed_at.name] = now
    errors = _fit_all(target, [c.decision for c in confirmed])
    guard_cols = [_stored(conn, col) for col in target.guards.values()]
    still_stale = or_(*(target.status == s for s in target.stale_statuses))
    if _is_postgresql(conn) and target.row_values is None:
        # One set-based statement: UPDATE … FROM unnest(:ids, :errors, …) AS v(id, error, …).
        arrays: dict[str, tuple[list[Any], Any]] = {
            "id": ([c.decision.candidate.job_id for c in confirmed], target.id.type),
            "error": (errors, Text()),
        }
        plain_status = isinstance(target.status.type, String) and not isinstance(
            target.status.type, SAEnum
        )
        if plain_status:
            arrays["status"] = ([c.status for c in confirmed], target.status.type)
        for i, col in enumerate(guard_cols):
            arrays[f"g{i}"] = ([c.guards[i] for c in confirmed], col.type)
        v = (
            func.unnest(
                *(
                    bindparam(f"jr_{name}", vals, type_=Array(type_))
                    for name, (vals, type_) in arrays.items()
                )
            )
            .table_valued(*arrays)
            .render_derived(name="jr_v")
        )
        if target.error is not None:
            values[target.error.name] = v.c.error
        cas = [target.id == v.c.id, still_stale]
        if plain_status:
            cas.append(target.status == v.c.status)
        cas += [col.is_not_distinct_from(v.c[f"g{i}"]) for i, col in enumerate(guard_cols)]
        changed = {
            row[0]
            for row in conn.execute(
                update(target.table).where(*cas).values(**values).returning(target.id)
            )
        }
        return [c.decision for c in confirmed if c.decision.candidate.job_id in changed]
    if target.error is not None:
        values[target.error.name] = bindparam("jr_error")
    per_row = [
        {} if target.row_values is None else dict(target.row_values(c.decision, now))
        for c in confirmed
    ]
    for name in per_row[0]:
        values[name] = bindparam(f"jr_row_{name}", type_=target.table.c[name].type)
    stmt = (
        update(target.table)
        .where(
            target.id == bindparam("jr_id"),
            still_stale,
            target.status == bindparam("jr_status"),
            *(
                col.is_not_distinct_from(bindparam(f"jr_g{i}", type_=col.type))
                for i, col in enumerate(guard_cols)
            ),
        )
        .values(**values)
    )
    done: list[Decision] = []
    # One statement per row: each rowcount says whether that row was still as judged
    # (an executemany's rowcount is only a total).
    for c, error, row in zip(confirmed, errors, per_row, strict=True):
        params = {"jr_id": c.decision.candidate.job_id, "jr_error": error, "jr_status": c.status}
        params.update({f"jr_g{i}": value for i, value in enumerate(c.guards)})
        params.update({f"jr_row_{name}": value for name, value in row.items()})
        if conn.execute(stmt, params).rowcount == 1:
            done.append(c.decision)
    return done


def _fit_all(target: SettleTarget, decisions: Sequence[Decision]) -> list[str]:
    """The error text of each decision, cut to the error column's length."""
    return [_fit(target, d.error or d.reason) for d in decisions]


def _is_postgresql(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def error_length(target: SettleTarget) -> int | None:
    """The length of the error column, if it is a ``String`` with one (else ``None``)."""
    if target.error is None:
        return None
    length = getattr(target.error.type, "length", None)
    if isinstance(target.error.type, String) and length:
        return int(length)
    return None


def _fit(target: SettleTarget, text: str) -> str:
    """Cut the error text to the error column's length, if it has one.

    :mod:`celery_jobreaper.bulk_text` cuts identically in SQL (``left(text, length - 1) || '…'``).
    """
    length = error_length(target)
    if length is not None and len(text) > length:
        return text[: max(0, length - 1)] + CUT_MARK
    return text


def event_of(decision: Decision, *, action: str, new_status: str | None) -> ledger.Event:
    """The ledger event of a decision about a job (its error text, else its reason)."""
    c = decision.candidate
    return ledger.Event(
        action=action,
        source=c.source,
        job_id=str(c.job_id),
        reason=decision.error or decision.reason,
        task_id=c.task_id,
        kind=c.kind,
        previous_status=c.status,
        new_status=new_status,
        owner=c.owner,
    )
