"""Settle decided jobs: compare-and-set updates plus ledger events, one transaction a batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    Table,
    Text,
    any_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import TypeDecorator

from .database import Database
from .planner import Decision
from .revoked import record_settled
from .schema import JobReaperTables
from .settings import DEFAULT_REVOKED_EXPIRES
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
    revoked_expires: float = DEFAULT_REVOKED_EXPIRES,
) -> list[Decision]:
    """Fail the jobs of *decisions* that are still as the planner saw them; return those.

    Call inside a transaction. Rows are locked first (``FOR UPDATE SKIP LOCKED`` where the
    database has it; SQLite's ``BEGIN IMMEDIATE`` serialises writers), re-checked against the
    stale predicate and the owner the planner judged, then updated together with one ledger
    event each. A row another reaper holds or has already settled is skipped, so any number of
    concurrent reapers settle each job exactly once. The task ids of the settled jobs are
    revoked (``jobreaper_revoked``, for *revoked_expires* seconds at most) in the same
    transaction.

    On PostgreSQL each step is one statement whatever the batch size: the ids, error texts and
    ledger columns travel as arrays (``= ANY(:ids)``, ``unnest(…)``), in binary with psycopg 3.
    """
    if not decisions:
        return []
    confirmed = _lock_and_check(conn, db, target, decisions)
    if not confirmed:
        return []
    _update(conn, target, confirmed, now)
    record_events(conn, tables, confirmed, now=now, run_id=run_id, new_status=target.failed_status)
    record_settled(
        conn, tables, [d.candidate.task_id for d in confirmed], expires=revoked_expires, now=now
    )
    return confirmed


def _lock_and_check(
    conn: Connection, db: Database, target: SettleTarget, decisions: Sequence[Decision]
) -> list[Decision]:
    """Lock the rows still stale; keep the decisions whose guard columns are unchanged."""
    by_id = {d.candidate.job_id: d for d in decisions}
    if _is_postgresql(conn):
        _send_arrays_in_binary(conn)
        ids = bindparam("jr_ids", list(by_id), type_=_Array(target.id.type))
        match: ColumnElement[bool] = target.id == any_(ids)
    else:
        match = target.id.in_(list(by_id))
    lock = select(target.id, *target.guards.values()).where(
        match, target.status.in_(target.stale_statuses)
    )
    if db.skip_locked:
        lock = lock.with_for_update(skip_locked=True)
    guards = list(target.guards.items())
    confirmed: list[Decision] = []
    for row in conn.execute(lock).all():
        decision = by_id.get(row[0])
        if decision is None:
            continue
        observed = decision.candidate
        if all(row[i] == getattr(observed, role) for i, (role, _) in enumerate(guards, 1)):
            confirmed.append(decision)
    return confirmed


def _update(
    conn: Connection, target: SettleTarget, confirmed: list[Decision], now: datetime
) -> None:
    values: dict[str, Any] = {target.status.name: target.failed_status, **target.extra_values}
    if target.completed_at is not None:
        values[target.completed_at.name] = now
    errors = _fit_all(target, confirmed)
    ids = [d.candidate.job_id for d in confirmed]
    where = target.status.in_(target.stale_statuses)
    if _is_postgresql(conn):
        # One set-based statement: UPDATE … FROM unnest(:ids, :errors) AS v(id, error).
        v = (
            func.unnest(
                bindparam("jr_ids", ids, type_=_Array(target.id.type)),
                bindparam("jr_errors", errors, type_=_Array(Text())),
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


def _fit_all(target: SettleTarget, decisions: Sequence[Decision]) -> list[str]:
    """The error text of each decision, cut to the error column's length."""
    return [_fit(target, d.error or d.reason) for d in decisions]


def _is_postgresql(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


class _BinaryList(list[Any]):
    """A list psycopg 3 sends as a binary array (see :func:`_send_arrays_in_binary`)."""


class _Array(TypeDecorator[list[Any]]):
    """A PostgreSQL array parameter; with psycopg 3 it travels in binary.

    In text format psycopg escapes every element with a regular expression, which costs more
    than everything else about a batch's parameters.
    """

    impl = ARRAY
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """Mark the list for psycopg's binary dumper (other drivers: as ``ARRAY`` does)."""
        if dialect.driver == "psycopg":
            return _BinaryList
        return super().bind_processor(dialect)


def _send_arrays_in_binary(conn: Connection) -> None:
    """Let psycopg 3 dump this connection's :class:`_BinaryList` parameters in binary."""
    if conn.dialect.driver != "psycopg":
        return
    from psycopg.types.array import ListBinaryDumper

    adapters = getattr(conn.connection.dbapi_connection, "adapters", None)
    if adapters is not None:
        adapters.register_dumper(_BinaryList, ListBinaryDumper)


#: Appended to an error text cut to its column's length.
CUT_MARK = "…"


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

    :mod:`celery_jobreaper.bulk` cuts identically in SQL (``left(text, length - 1) || '…'``).
    """
    length = error_length(target)
    if length is not None and len(text) > length:
        return text[: max(0, length - 1)] + CUT_MARK
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
    if not decisions:
        return
    fixed = {"run_id": run_id, "at": now, "new_status": new_status, "action": action}
    per_event: dict[str, list[Any]] = {
        "job_id": [str(d.candidate.job_id) for d in decisions],
        "source": [d.candidate.source for d in decisions],
        "task_id": [d.candidate.task_id for d in decisions],
        "kind": [d.candidate.kind for d in decisions],
        "previous_status": [d.candidate.status for d in decisions],
        "reason": [d.error or d.reason for d in decisions],
        "owner": [d.candidate.owner for d in decisions],
    }
    if _is_postgresql(conn) and len(decisions) > 1:
        _insert_unnest(conn, tables.events, fixed, per_event)
        return
    conn.execute(
        insert(tables.events),
        [
            {**fixed, **{name: values[i] for name, values in per_event.items()}}
            for i in range(len(decisions))
        ],
    )


def _insert_unnest(
    conn: Connection, table: Table, fixed: dict[str, Any], per_row: dict[str, list[Any]]
) -> None:
    """``INSERT INTO table (…) SELECT … FROM unnest(:a, :b, …)``: one statement, any row count.

    Columns whose value is the same on every row are bound once instead of as an array (all
    but the first of *per_row*, which always goes as an array and so gives the row count).
    """
    arrays: dict[str, list[Any]] = {}
    for name, values in per_row.items():
        if arrays and values.count(values[0]) == len(values):
            fixed = {**fixed, name: values[0]}
        else:
            arrays[name] = values
    _send_arrays_in_binary(conn)
    v = (
        func.unnest(
            *(
                bindparam(f"jr_{name}", values, type_=_Array(table.c[name].type))
                for name, values in arrays.items()
            )
        )
        .table_valued(*arrays)
        .render_derived(name="jr_v")
    )
    names = [*fixed, *arrays]
    exprs: list[ColumnElement[Any]] = [
        bindparam(f"jr_{name}", value, type_=table.c[name].type) for name, value in fixed.items()
    ]
    exprs += [v.c[name] for name in arrays]
    conn.execute(insert(table).from_select(names, select(*exprs).select_from(v)))
