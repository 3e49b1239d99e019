"""Tracked jobs: task signals write ``jobreaper_jobs`` with an owner incarnation and a fence."""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import logging
import os
import re
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from celery import signals as celery_signals
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from sqlalchemy import (
    DateTime,
    String,
    Text,
    bindparam,
    exc,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection

from . import signals
from .apply import record_decisions as record_events
from .clock import utcnow
from .database import Database
from .liveness import Incarnation
from .planner import Decision
from .schema import JobReaperTables
from .settings import Settings
from .sources.base import Candidate
from .vocabulary import FAILED, RETRY, REVOKED, RUNNING, SUCCEEDED

logger = logging.getLogger(__name__)

_STATUS = {
    "SUCCESS": SUCCEEDED,
    "FAILURE": FAILED,
    "RETRY": RETRY,
    "REVOKED": REVOKED,
    "IGNORED": SUCCEEDED,
    "REJECTED": FAILED,
}
LATE_RESULT = "late_result"
_T = TypeVar("_T")

#: Seconds between two flushes of a process's writer thread (one transaction each); a record
#: waits at most about twice this long (see ``Tracker._take``).
FLUSH_INTERVAL = 0.005
#: Pending records that make the writer write at once, without waiting for the interval.
FLUSH_EARLY = 100
#: Most records written in one transaction (more wait for the next one, written right after).
MAX_BATCH = 1000
#: Most records a process keeps while the database cannot take them; the oldest go beyond it.
MAX_PENDING = 10_000
#: Seconds before the first retry after a failed write; doubles up to ``TRACKING_BACKOFF``.
RETRY_FIRST = 0.5
#: Columns a start writes; a retry or redelivery of a known task id resets them all (and keeps
#: ``times_reaped``).
_RESET = (
    "task_name",
    "status",
    "incarnation_id",
    "node",
    "started_at",
    "completed_at",
    "error",
    "fence",
)
_UPSERTED = ("task_id", *_RESET)


@dataclasses.dataclass(slots=True)
class _Start:
    """This process started a task and holds *fence* for it."""

    task_id: str
    task_name: str
    node: str
    incarnation_id: str
    started_at: datetime
    fence: str
    seq: int = 0


@dataclasses.dataclass(slots=True)
class _Finish:
    """This process finished a task; applied only while the row still holds *fence*."""

    task_id: str
    fence: str | None
    status: str
    completed_at: datetime
    error: str | None
    seq: int = 0


_Record = _Start | _Finish


class Tracker:
    """Writes tracked-job rows from task signals; one per worker process tree.

    ``task_prerun`` / ``task_postrun`` only queue a record (a start: task id, name, node,
    incarnation, start time and a fresh fence; a finish: task id, the fence, status, end time,
    error) and return. A daemon writer thread per process (started lazily in the process that
    queues, so each forked pool process has its own) writes what is queued, at most every
    :data:`FLUSH_INTERVAL` seconds and preferably right after a task ended (a record waits
    about twice that at most; at once when :data:`FLUSH_EARLY` records wait), in one
    transaction per flush: the starts first, as one multi-row upsert (a retry or redelivery of a
    known task id resets its row, ``times_reaped`` kept; a start and its finish in the same
    flush become one row written with its final status), then the finishes, as a fenced
    compare-and-set (``WHERE task_id = … AND fence = … AND status = 'running'``; one set-based
    statement on PostgreSQL, one statement per row elsewhere). A finish that changes nothing
    while it held a fence is a late result: the job was settled (or taken over) while the task
    ran; the settled row is kept, a ``late_result`` ledger event is written in the same
    transaction, and after the commit a warning is logged and :data:`signals.late_result` sent
    (from the writer thread). Records of one task are applied in the order they happened.
    Most flushes hold only starts (their finishes merged): that one statement is then the
    whole transaction (in autocommit mode on PostgreSQL and MySQL/MariaDB; a flush with more to
    do opens an explicit transaction).

    Pending records are written when the worker stops (the bootstep calls :meth:`flush`), when a
    pool process exits (``worker_process_shutdown``) and at interpreter exit. If the database
    cannot take them the writer keeps them (at most :data:`MAX_PENDING`; beyond that the oldest
    are dropped with a warning) and retries with a growing pause, logging once per failure
    streak; records the database refuses (not a connection problem) are dropped.

    The trade-off: a process killed hard (SIGKILL, OOM) loses the records it had not written
    yet, those of its last ``2 * FLUSH_INTERVAL`` seconds at most (a write under way commits or
    rolls back whole). A lost start leaves no row (or a redelivered task's old row as it was),
    so no ghost can come of it: the job is simply not tracked. A lost finish leaves the row
    ``running`` with the killed process's incarnation as owner, and it is settled as failed
    although the task finished: when the worker is restarted (its earlier incarnation is dead
    by definition) or found dead; if only a pool process was killed, once that worker stops.
    Fencing is unchanged: a settled job is never overwritten by its old owner. With gevent or
    eventlet there is no writer thread: each record is written at once, in its own
    transaction, as the signal fires. :meth:`lost` (the main process saw a
    task end without its pool process) also writes at once.
    """

    def __init__(
        self, db: Database, tables: JobReaperTables, settings: Settings, me: Incarnation
    ) -> None:
        self.db = db
        self.t = tables.jobs
        self.tables = tables
        self.settings = settings
        self.me = me
        self._fences: dict[str, str] = {}  # task id -> fence token, in the process running it
        self._tracks: dict[str, bool] = {}  # task name -> settings.tracks(name)
        self._held: Connection | None = None  # the connection kept for lost() ...
        self._held_pid = 0  # ... and the process it belongs to
        t = self.t
        self._insert = insert(t)
        self._restart = update(t).where(t.c.task_id == bindparam("jr_task_id"))
        self._finish = update(t).where(
            t.c.task_id == bindparam("jr_task_id"), t.c.status == RUNNING
        )
        self._finish_fenced = self._finish.where(t.c.fence == bindparam("jr_fence"))
        self._upserts: dict[str, Any] = {}  # dialect name -> upsert statement (None: none)
        self._pg_finish: Any = None
        self._pg_upsert_sql: str | None = None
        self._reset_writer()
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=functools.partial(_after_fork, ref))

    def _reset_writer(self) -> None:
        """Fresh writer state for this process (at start and in a forked child)."""
        _keep_inherited(getattr(self, "_writer_conn", None))
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._pending: collections.deque[_Record] = collections.deque()
        self._seq = 0  # sequence number of the last queued record
        self._urgent_upto = 0  # records up to this one are written without waiting
        self._inflight = 0  # records the writer is writing now
        self._idle = False  # the writer waits for records with no time limit
        self._next_at = 0.0  # monotonic time from which the next flush may happen
        self._writer: threading.Thread | None = None
        self._writer_conn: Connection | None = None
        self._dropped: dict[str, bool] = {}  # fences whose start was dropped (ordered set)
        self._retry_at = 0.0
        self._streak = 0  # failed attempts in a row
        self._failures = 0  # failed attempts ever (flush() watches it)
        self._dropped_in_streak = 0
        self._overflow_warned = False

    def tracks(self, task_name: str) -> bool:
        """Whether tasks of this name are tracked (``jobreaper_track_task_names``), cached."""
        tracked = self._tracks.get(task_name)
        if tracked is None:
            tracked = self._tracks[task_name] = self.settings.tracks(task_name)
        return tracked

    def started(self, task_id: str, task_name: str, node: str | None) -> None:
        """Record that this process started *task_id*; remember the fence it holds."""
        fence = uuid.uuid4().hex
        record = _Start(task_id, task_name, node or self.me.node, self.me.id, utcnow(), fence)
        if _greened():
            self._write_now([record])  # raises: no fence held, so the end is not recorded
            self._fences[task_id] = fence
            return
        self._fences[task_id] = fence
        self._submit(record)

    def finished(self, task_id: str, state: str | None, error: str | None = None) -> None:
        """Record the task's end, fenced: a settled job is never overwritten by its old owner."""
        fence = self._fences.pop(task_id, None)
        record = _Finish(task_id, fence, _STATUS.get(state or "", FAILED), utcnow(), error)
        if _greened():
            self._write_now([record])
        else:
            self._submit(record)

    def lost(self, task_id: str, error: str, status: str = FAILED) -> None:
        """The main process saw the task end without its pool process (revoked, worker lost,
        hard time limit): the job becomes *status* (``failed`` or ``revoked``)."""
        self._fences.pop(task_id, None)
        if self._pid == os.getpid() and (self._pending or self._inflight):
            self.flush()  # a start of this task still queued here must not come after this
        t = self.t
        stmt = (
            update(t)
            .where(t.c.task_id == task_id, t.c.status == RUNNING, t.c.incarnation_id == self.me.id)
            .values(
                status=status,
                completed_at=utcnow(),
                error=error,
                fence=None,
            )
        )
        self._write(lambda conn: conn.execute(stmt))

    # --- the queue and the writer thread ----------------------------------------------------

    def _submit(self, record: _Record) -> None:
        """Queue *record* for this process's writer thread (started if needed)."""
        if self._pid != os.getpid():
            self._reset_writer()  # forked without the at-fork hook: start afresh
        with self._cond:
            self._seq += 1
            record.seq = self._seq
            pending = self._pending
            pending.append(record)
            size = len(pending)
            if size + self._inflight > MAX_PENDING:
                self._overflow()
            if self._idle or size == FLUSH_EARLY or (isinstance(record, _Finish) and self._due()):
                self._cond.notify_all()  # the writer (and any flush() waiting: they re-check)
            writer = self._writer
            if writer is None or not writer.is_alive():
                self._start_writer()

    def _due(self) -> bool:
        """Whether the writer may flush now (a task end then wakes it; lock held)."""
        now = time.monotonic()
        return now >= self._next_at and now >= self._retry_at

    def _start_writer(self) -> None:
        """Start this process's writer thread (call with the lock held)."""
        writer = threading.Thread(target=self._run, name="jobreaper-tracking", daemon=True)
        self._writer = writer
        self._next_at = max(self._next_at, time.monotonic() + FLUSH_INTERVAL)
        writer.start()

    def _overflow(self) -> None:
        """Drop the oldest pending records beyond :data:`MAX_PENDING` (lock held)."""
        dropped = 0
        while self._pending and len(self._pending) + self._inflight > MAX_PENDING:
            self._forget(self._pending.popleft())
            dropped += 1
        self._dropped_in_streak += dropped
        if not self._overflow_warned:
            self._overflow_warned = True
            logger.warning(
                "jobreaper: more than %d task tracking records wait for the database in this "
                "process; dropping the oldest (their jobs may later be settled as failed, or "
                "not be tracked)",
                MAX_PENDING,
            )

    def _forget(self, record: _Record) -> None:
        """A record is dropped: a dropped start's finish must be dropped too (lock held)."""
        if isinstance(record, _Start):
            self._dropped[record.fence] = True
            while len(self._dropped) > MAX_PENDING:
                del self._dropped[next(iter(self._dropped))]

    def _run(self) -> None:
        """The writer thread: take what is queued, write it, forever; never raises."""
        while True:
            batch = self._take()
            try:
                self._write_batch(batch)
            except Exception:  # a bug; the writer must live on
                logger.exception("jobreaper: the task tracking writer failed")
            finally:
                with self._cond:
                    self._inflight = 0
                    self._next_at = time.monotonic() + FLUSH_INTERVAL
                    self._cond.notify_all()

    def _take(self) -> list[_Record]:
        """Wait for records to write and return the next batch (marks it in flight).

        A flush may happen :data:`FLUSH_INTERVAL` after the previous one (or after records
        come in after a quiet time), and then does at the first task end: between two tasks,
        so that a start and its end are usually written together as one row, and the writer is
        woken once per flush. One more interval later whatever is pending is written anyway
        (a long task's start). :data:`FLUSH_EARLY` pending records or a waiting :meth:`flush`
        make it write at once.
        """
        with self._cond:
            while True:
                pending = self._pending
                now = time.monotonic()
                if pending and pending[0].seq <= self._urgent_upto:  # flush() waits for it
                    return self._pop_batch()
                deadline = self._next_at + FLUSH_INTERVAL
                if not pending and now >= deadline:  # quiet: sleep until a record comes
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                    self._next_at = max(self._next_at, time.monotonic() + FLUSH_INTERVAL)
                    continue
                if (
                    pending
                    and now >= self._retry_at
                    and (
                        len(pending) >= FLUSH_EARLY
                        or now >= deadline
                        or (now >= self._next_at and isinstance(pending[-1], _Finish))
                    )
                ):
                    return self._pop_batch()
                # Woken early by a task end after _next_at, FLUSH_EARLY records or flush().
                self._cond.wait(max(deadline, self._retry_at) - now)

    def _pop_batch(self) -> list[_Record]:
        """Take up to :data:`MAX_BATCH` records, minus finishes of dropped starts (lock held)."""
        pending = self._pending
        batch: list[_Record] = []
        for _ in range(min(MAX_BATCH, len(pending))):
            record = pending.popleft()
            if (
                isinstance(record, _Finish)
                and record.fence is not None
                and self._dropped.pop(record.fence, False)
            ):
                continue  # its start never reached the database: nothing to finish
            batch.append(record)
        self._inflight = len(batch)
        return batch

    def _write_batch(self, batch: list[_Record]) -> None:
        """Write *batch* in one transaction; on failure keep it (or drop what is refused)."""
        if not batch:
            return
        try:
            late = self._write_once(batch)
        except Exception as error:
            if _transient(error):
                self._failed(batch, error)
                return
            late = self._isolate(batch, error)
        else:
            self._succeeded()
        self._report_late(late)

    def _write_once(self, records: Sequence[_Record]) -> list[tuple[str, str]]:
        """One transaction on the writer's connection; return the late results."""
        for attempt in (1, 2):
            conn = self._writer_conn
            if conn is None:
                conn = self.db.connect()
                if conn.dialect.name in _AUTOCOMMIT:
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                self._writer_conn = conn
            try:
                return self._apply(conn, records)
            except Exception as error:
                if _transient(error):
                    self._close_writer_conn()
                    if attempt == 1 and getattr(error, "connection_invalidated", False):
                        continue  # the server dropped the idle connection: reconnect once
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _isolate(self, batch: list[_Record], error: Exception) -> list[tuple[str, str]]:
        """The database refused the batch: write it one task at a time, drop what it refuses."""
        groups: dict[str, list[_Record]] = {}
        for record in batch:
            groups.setdefault(record.task_id, []).append(record)
        items = list(groups.values())
        late: list[tuple[str, str]] = []
        refused = 0
        written = 0
        for i, group in enumerate(items):
            try:
                late += self._write_once(group)
                written += 1
            except Exception as again:
                if _transient(again):
                    rest = sorted((r for g in items[i:] for r in g), key=lambda r: r.seq)
                    self._failed(rest, again)
                    return late
                error = again
                refused += len(group)
                with self._cond:
                    for record in group:
                        self._forget(record)
                    for record in group:  # a finish dropped with its start needs no mark
                        if isinstance(record, _Finish) and record.fence is not None:
                            self._dropped.pop(record.fence, None)
        with self._cond:
            self._dropped_in_streak += refused
            if not written:  # nothing went through: pause as after a connection failure
                self._streak += 1
                self._failures += 1
                self._urgent_upto = 0
                self._retry_at = time.monotonic() + self._pause()
                self._cond.notify_all()
            log = bool(written) or self._streak == 1  # a lasting refusal: once per streak
        if log:
            logger.error(
                "jobreaper: the database refused %d task tracking record(s), which were "
                "dropped (%s)",
                refused,
                _summary(error),
                exc_info=error,
            )
        if written:
            self._succeeded()
        return late

    def _failed(self, records: list[_Record], error: Exception) -> None:
        """Keep *records* (first in line) and pause before the next attempt."""
        with self._cond:
            self._inflight = 0  # back in the queue
            self._pending.extendleft(reversed(records))
            if len(self._pending) > MAX_PENDING:
                self._overflow()
            self._streak += 1
            self._failures += 1
            self._urgent_upto = 0  # flush() returns False; the next attempt waits its turn
            pause = self._pause()
            self._retry_at = time.monotonic() + pause
            first = self._streak == 1
            self._cond.notify_all()
        if first:
            logger.warning(
                "jobreaper: could not write %d task tracking record(s) (%s); keeping them and "
                "retrying with pauses of up to %g s (at most %d kept)",
                len(records),
                _summary(error),
                TRACKING_BACKOFF,
                MAX_PENDING,
            )

    def _pause(self) -> float:
        return float(min(TRACKING_BACKOFF, RETRY_FIRST * 2 ** min(self._streak - 1, 16)))

    def _succeeded(self) -> None:
        """A write went through: end a failure streak (and say so)."""
        if not self._streak and not self._overflow_warned:
            return
        with self._cond:
            streak, dropped = self._streak, self._dropped_in_streak
            self._streak = self._dropped_in_streak = 0
            self._retry_at = 0.0
            self._overflow_warned = False
        if streak:
            logger.warning(
                "jobreaper: task tracking writes work again after %d failed attempt(s); %d "
                "record(s) were dropped meanwhile",
                streak,
                dropped,
            )

    def _close_writer_conn(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # already broken: nothing to give back
                logger.debug("jobreaper: closing the tracking connection failed", exc_info=True)

    def _cleared(self, upto: int) -> bool:
        """Every record up to *upto* is written or dropped (lock held)."""
        return not self._inflight and (not self._pending or self._pending[0].seq > upto)

    def flush(self, timeout: float | None = None) -> bool:
        """Write this process's queued records now; True once all of them were written.

        Returns False if the attempt failed (the records stay queued) or *timeout* (default:
        ``jobreaper_connect_timeout`` + 10 s) passed.
        """
        if self._pid != os.getpid():
            return True  # a forked child that queued nothing yet
        if timeout is None:
            timeout = self.settings.connect_timeout + 10.0
        with self._cond:
            if self._cleared(self._seq):
                return True
            writer = self._writer
            if writer is threading.current_thread():
                return False  # e.g. a late_result receiver: the writer cannot wait for itself
            upto, failures = self._seq, self._failures
            self._urgent_upto = max(self._urgent_upto, upto)
            if writer is None or not writer.is_alive():
                try:
                    self._start_writer()
                except RuntimeError:  # interpreter shutting down: write in this thread
                    return self._flush_here(upto, failures)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._cleared(upto) or self._failures > failures, timeout)
            return self._cleared(upto)

    def _flush_here(self, upto: int, failures: int) -> bool:
        """Write up to record *upto* in the calling thread (called and returns with the lock)."""
        while not self._cleared(upto) and self._failures == failures:
            batch = self._pop_batch()
            self._cond.release()
            try:
                self._write_batch(batch)
            finally:
                self._cond.acquire()
                self._inflight = 0
        return self._cleared(upto)

    def pending(self) -> int:
        """Records queued in this process and not yet written."""
        if self._pid != os.getpid():
            return 0
        return len(self._pending) + self._inflight

    def flush_before_exit(self, why: str) -> None:
        """Flush, and say how many records are lost if that fails (never raises)."""
        try:
            if self.pending() and not self.flush():
                logger.warning(
                    "jobreaper: %d task tracking record(s) of this process could not be "
                    "written before %s",
                    self.pending(),
                    why,
                )
        except Exception:
            logger.exception("jobreaper: flushing task tracking records failed")

    # --- writing ----------------------------------------------------------------------------

    def _apply(self, conn: Connection, records: Sequence[_Record]) -> list[tuple[str, str]]:
        """Write *records* in one transaction, in order per task; return the late results.

        The records go in rounds; in each, a task has at most one start (and a finish of the
        same fence merged into it) and one finish, and starts are written before finishes.
        Usually everything is one round, and often only starts (each with its finish merged):
        then the one upsert statement is the transaction (PostgreSQL, MySQL: the connection is
        in autocommit mode, and opens a transaction explicitly when a flush needs more).
        """
        rounds = _rounds(records)
        if not _autocommit(conn):
            with conn.begin():
                return self._apply_rounds(conn, rounds)
        if len(rounds) == 1 and not rounds[0][1]:
            self._upsert(conn, list(rounds[0][0].values()))  # one statement: atomic on its own
            return []
        conn.exec_driver_sql("BEGIN")
        try:
            late = self._apply_rounds(conn, rounds)
        except BaseException:
            try:
                conn.exec_driver_sql("ROLLBACK")
            except Exception:  # the connection is broken: the server rolls back
                logger.debug("jobreaper: rolling back tracking records failed", exc_info=True)
            raise
        conn.exec_driver_sql("COMMIT")
        return late

    def _apply_rounds(
        self, conn: Connection, rounds: list[tuple[dict[str, dict[str, Any]], list[_Finish]]]
    ) -> list[tuple[str, str]]:
        late: list[tuple[str, str]] = []
        for starts, finishes in rounds:
            if starts:
                self._upsert(conn, list(starts.values()))
            if finishes:
                late += self._complete(conn, finishes)
        if late:
            self._record_late(conn, late)
        return late

    def _upsert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert the rows; a known task id gets its row reset (``times_reaped`` kept)."""
        name = conn.dialect.name
        if name not in self._upserts:
            self._upserts[name] = self._upsert_statement(name)
        stmt = self._upserts[name]
        if name == "postgresql":  # one statement whatever the row count: columns as arrays
            params = {f"jr_{c}": [row[c] for row in rows] for c in _UPSERTED}
            if conn.dialect.driver == "psycopg":
                # The hottest statement: sent as compiled once, its arrays dumped in binary
                # (what it costs in Python is time the pool process's tasks wait for).
                if self._pg_upsert_sql is None:
                    sql = str(stmt.compile(dialect=conn.dialect))
                    self._pg_upsert_sql = re.sub(r"%\((\w+)\)s", r"%(\1)b", sql)
                conn.exec_driver_sql(self._pg_upsert_sql, params)
            else:
                conn.execute(stmt, params)
            return
        if stmt is not None:
            conn.execute(stmt, rows)
            return
        for row in rows:  # a dialect without an upsert: update, else insert
            values = {c: row[c] for c in _RESET}
            if not conn.execute(self._restart, {"jr_task_id": row["task_id"], **values}).rowcount:
                conn.execute(self._insert, row)

    def _upsert_statement(self, dialect: str) -> Any:
        t = self.t
        if dialect == "postgresql":
            # INSERT … SELECT … FROM unnest(:task_ids, :task_names, …) ON CONFLICT DO UPDATE
            v = (
                func.unnest(
                    *(bindparam(f"jr_{c}", type_=postgresql.ARRAY(t.c[c].type)) for c in _UPSERTED)
                )
                .table_valued(*_UPSERTED)
                .render_derived(name="jr_v")
            )
            rows = select(*(v.c[c] for c in _UPSERTED), literal_column("0")).select_from(v)
            pg = postgresql.insert(t).from_select([*_UPSERTED, "times_reaped"], rows)
            return pg.on_conflict_do_update(
                index_elements=[t.c.task_id], set_={c: pg.excluded[c] for c in _RESET}
            )
        if dialect == "sqlite":
            lite = sqlite.insert(t)
            return lite.on_conflict_do_update(
                index_elements=[t.c.task_id], set_={c: lite.excluded[c] for c in _RESET}
            )
        if dialect in {"mysql", "mariadb"}:
            my = mysql.insert(t)
            return my.on_duplicate_key_update({c: my.inserted[c] for c in _RESET})
        return None

    def _complete(self, conn: Connection, finishes: list[_Finish]) -> list[tuple[str, str]]:
        """Apply the finishes (fenced compare-and-set); return those that changed nothing."""
        fenced: list[_Finish] = []
        for f in finishes:
            if f.fence is None:  # no fence held: complete whatever still runs
                conn.execute(self._finish, _finish_values(f))
            else:
                fenced.append(f)
        if not fenced:
            return []
        if conn.dialect.name == "postgresql" and len(fenced) > 1:
            done = set(
                conn.execute(
                    self._pg_finish_statement(),
                    {
                        "jr_ids": [f.task_id for f in fenced],
                        "jr_fences": [f.fence for f in fenced],
                        "jr_statuses": [f.status for f in fenced],
                        "jr_completed": [f.completed_at for f in fenced],
                        "jr_errors": [f.error for f in fenced],
                    },
                ).scalars()
            )
        else:
            done = {
                f.task_id
                for f in fenced
                # One statement: applies only while the row still holds our fence.
                if conn.execute(
                    self._finish_fenced, {**_finish_values(f), "jr_fence": f.fence}
                ).rowcount
            }
        return [(f.task_id, f.status) for f in fenced if f.task_id not in done]

    def _pg_finish_statement(self) -> Any:
        """``UPDATE jobs SET … FROM unnest(:ids, :fences, …) v WHERE … RETURNING task_id``."""
        if self._pg_finish is None:
            t = self.t
            array = postgresql.ARRAY
            v = (
                func.unnest(
                    bindparam("jr_ids", type_=array(String())),
                    bindparam("jr_fences", type_=array(String())),
                    bindparam("jr_statuses", type_=array(String())),
                    bindparam("jr_completed", type_=array(DateTime())),
                    bindparam("jr_errors", type_=array(Text())),
                )
                .table_valued("task_id", "fence", "status", "completed_at", "error")
                .render_derived(name="jr_v")
            )
            self._pg_finish = (
                update(t)
                .where(t.c.task_id == v.c.task_id, t.c.fence == v.c.fence, t.c.status == RUNNING)
                .values(status=v.c.status, completed_at=v.c.completed_at, error=v.c.error)
                .values(fence=None)
                .returning(t.c.task_id)
            )
        return self._pg_finish

    def _record_late(self, conn: Connection, late: list[tuple[str, str]]) -> None:
        """One ``late_result`` ledger event per late finish (in the flush's transaction)."""
        by_status: dict[str, list[Decision]] = {}
        for task_id, status in late:
            # The job was settled (or taken over) while we ran: keep what the reaper wrote.
            by_status.setdefault(status, []).append(
                Decision(
                    Candidate(
                        self.t.name, task_id, RUNNING, None, None, self.me.node, self.me.id, task_id
                    ),
                    "leave",
                    f"late result {status!r} from {self.me.node} after the job was settled; "
                    "not applied",
                )
            )
        now = utcnow()
        for status, decisions in by_status.items():
            record_events(
                conn,
                self.tables,
                decisions,
                now=now,
                run_id=None,
                new_status=status,
                action=LATE_RESULT,
            )

    def _report_late(self, late: list[tuple[str, str]]) -> None:
        """After the commit: log each late result and send :data:`signals.late_result`."""
        for task_id, status in late:
            logger.warning(
                "jobreaper: late result for task %s: %s finished it as %s after it had been "
                "settled; the settled row was kept and the late result recorded in the ledger",
                task_id,
                self.me.node,
                status,
            )
            signals.late_result.send(sender=self, task_id=task_id, status=status, node=self.me.node)

    def _write_now(self, records: list[_Record]) -> None:
        """Write *records* at once in their own transaction (gevent/eventlet: no writer)."""
        with self.db.connect() as conn:
            late = self._apply(conn, records)
        self._report_late(late)

    def _write(self, work: Callable[[Connection], _T]) -> _T:
        """Run *work* on an autocommit connection: the held one where tasks run one at a time."""
        if not _one_task_at_a_time():
            with self.db.connect() as conn:
                result = work(conn.execution_options(isolation_level="AUTOCOMMIT"))
                conn.commit()  # SQLite: jobreaper's BEGIN IMMEDIATE still opens a transaction
                return result
        for attempt in (1, 2):
            conn = self._connection()
            try:
                result = work(conn)
                conn.commit()  # ends the logical transaction (SQLite: the real one)
                return result
            except exc.DBAPIError as error:
                self._close_held()
                if error.connection_invalidated and attempt == 1:
                    continue  # the server went away since the last write: reconnect once
                raise
            except BaseException:
                self._close_held()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> Connection:
        pid = os.getpid()
        if self._held is not None and self._held_pid != pid:
            _keep_inherited(self._held)  # inherited from the parent through fork: never touch it
            self._held = None
        if self._held is None:
            self._held = self.db.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._held_pid = pid
        return self._held

    def _close_held(self) -> None:
        held, self._held = self._held, None
        if held is not None and self._held_pid == os.getpid():
            try:
                held.close()
            except Exception:  # already broken: nothing to give back
                logger.debug("jobreaper: closing the tracking connection failed", exc_info=True)

    def close(self) -> None:
        """Flush, then give back this process's tracking connections (made again when needed)."""
        self._close_held()
        if self._pid != os.getpid():
            return
        self.flush()
        with self._cond:
            if self._inflight:  # a write that is still running (flush timed out)
                return
            conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("jobreaper: closing the tracking connection failed", exc_info=True)


#: Connections a forked child inherited: kept referenced so that garbage collection never
#: resets or closes them (they are the parent's sessions).
_INHERITED: list[Connection] = []


def _keep_inherited(conn: Connection | None) -> None:
    if conn is not None:
        _INHERITED.append(conn)


def _after_fork(ref: weakref.ref[Tracker]) -> None:
    """In a forked child: the parent's queue, lock and writer thread are not ours."""
    tracker = ref()
    if tracker is not None:
        tracker._reset_writer()


#: Dialects whose tracking writer connection is in autocommit mode (see ``Tracker._apply``).
_AUTOCOMMIT = frozenset({"postgresql", "mysql", "mariadb"})


def _autocommit(conn: Connection) -> bool:
    return (
        conn.dialect.name in _AUTOCOMMIT
        and conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    )


def _finish_values(f: _Finish) -> dict[str, Any]:
    return {
        "jr_task_id": f.task_id,
        "status": f.status,
        "completed_at": f.completed_at,
        "error": f.error,
        "fence": None,
    }


def _rounds(records: Sequence[_Record]) -> list[tuple[dict[str, dict[str, Any]], list[_Finish]]]:
    """Split *records* into rounds that keep each task's records in order.

    In a round a task has at most one start and one finish, and the round's starts are written
    before its finishes; a finish of the start in the same round (same fence) is merged into
    the start's row (written once, with its final status). A task whose next record cannot go
    in its current round goes on in the next one.
    """
    rounds: list[tuple[dict[str, dict[str, Any]], list[_Finish]]] = []
    where: dict[str, tuple[int, str]] = {}  # task id -> (its round, "start" / "finish" / "both")

    def round_(i: int) -> tuple[dict[str, dict[str, Any]], list[_Finish]]:
        if i == len(rounds):
            rounds.append(({}, []))
        return rounds[i]

    for r in records:
        seen = where.get(r.task_id)
        if isinstance(r, _Start):
            i = 0 if seen is None else seen[0] + 1
            round_(i)[0][r.task_id] = {
                "task_id": r.task_id,
                "task_name": r.task_name,
                "status": RUNNING,
                "incarnation_id": r.incarnation_id,
                "node": r.node,
                "started_at": r.started_at,
                "completed_at": None,
                "error": None,
                "fence": r.fence,
                "times_reaped": 0,
            }
            where[r.task_id] = (i, "start")
            continue
        if seen is not None and seen[1] == "start" and r.fence is not None:
            row = rounds[seen[0]][0][r.task_id]
            if row["fence"] == r.fence:  # started and finished in this flush: one row
                row.update(status=r.status, completed_at=r.completed_at, error=r.error, fence=None)
                where[r.task_id] = (seen[0], "both")
                continue
        i = 0 if seen is None else seen[0] + 1
        round_(i)[1].append(r)
        where[r.task_id] = (i, "finish")
    return rounds


def _transient(error: BaseException) -> bool:
    """Whether a failed write may work when tried again (connection trouble, lock conflicts)."""
    if isinstance(error, exc.DBAPIError):
        return bool(error.connection_invalidated) or isinstance(
            error, exc.OperationalError | exc.InterfaceError
        )
    return isinstance(error, exc.TimeoutError | exc.DisconnectionError | OSError)


def _summary(error: BaseException) -> str:
    """``Type: first line of the message``, short enough for one log line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _greened() -> bool:
    """Whether gevent or eventlet is in use: tasks interleave in greenlets, no writer thread."""
    return "gevent" in sys.modules or "eventlet" in sys.modules


def _one_task_at_a_time() -> bool:
    """Whether this thread runs tasks one after another (prefork child, solo, main process).

    Not with ``-P threads`` (tasks run in other threads) nor with gevent/eventlet, where
    greenlets of one thread interleave tasks.
    """
    return threading.current_thread() is threading.main_thread() and not _greened()


_tracker: Tracker | None = None


def set_tracker(tracker: Tracker | None) -> None:
    """Install the process-wide tracker (inherited by forked pool processes)."""
    global _tracker  # noqa: PLW0603
    _tracker = tracker


#: Seconds tracking stays off in a process after a synchronous write failed (so tasks do not
#: each wait for a connect timeout while the database is down); also the longest pause between
#: the writer thread's retries.
TRACKING_BACKOFF = 10.0
_down_until = 0.0


def _guard(what: str, task_id: Any, fn: Any, *args: Any) -> None:
    global _down_until  # noqa: PLW0603
    now = time.monotonic()
    if now < _down_until:
        return
    try:
        fn(*args)
    except Exception:  # tracking must never break a task
        _down_until = now + TRACKING_BACKOFF
        logger.exception(
            "jobreaper: could not record %s of task %s; task tracking in this process pauses "
            "for %g s",
            what,
            task_id,
            TRACKING_BACKOFF,
        )


def _on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    tracker = _tracker
    if tracker is None or task_id is None or task is None:
        return
    if not tracker.tracks(task.name):
        return
    node = getattr(task.request, "hostname", None)
    _guard("the start", task_id, tracker.started, task_id, task.name, node)


def _on_postrun(
    sender: Any = None,
    task_id: str | None = None,
    state: str | None = None,
    retval: Any = None,
    **_: Any,
) -> None:
    tracker = _tracker
    if tracker is None or task_id is None or task_id not in tracker._fences:
        return
    error = f"{type(retval).__name__}: {retval}" if isinstance(retval, BaseException) else None
    _guard("the end", task_id, tracker.finished, task_id, state, error)


def _on_revoked(
    sender: Any = None, request: Any = None, terminated: bool = False, **_: Any
) -> None:
    tracker = _tracker
    if tracker is None or request is None or not terminated:
        return
    _guard("the revoke", request.id, tracker.lost, request.id, "revoked and terminated", REVOKED)


def _on_failure(
    sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
) -> None:
    """The main process saw a task's pool process die (killed, out of memory, hard time limit).

    Celery sends ``task_failure`` from the main process with ``WorkerLostError`` when a pool
    process exits during a task, and with ``TimeLimitExceeded`` when it kills one for a hard
    time limit (``Request.on_timeout``): the task's own process cannot record its end then.
    """
    tracker = _tracker
    if tracker is None or task_id is None:
        return
    if not isinstance(exception, (WorkerLostError, TimeLimitExceeded)):
        return
    error = f"{type(exception).__name__}: {exception}"
    _guard("the loss", task_id, tracker.lost, task_id, error, FAILED)


def _on_process_shutdown(sender: Any = None, **_: Any) -> None:
    """A pool process exits (it leaves with ``os._exit``: no atexit); write what it queued."""
    tracker = _tracker
    if tracker is not None:
        tracker.flush_before_exit("this pool process exits")


def _at_exit() -> None:
    tracker = _tracker
    if tracker is not None:
        tracker.flush_before_exit("the process exits")


_atexit_registered = False


def connect_signals() -> None:
    """Connect the task signals once per process (idempotent)."""
    global _atexit_registered  # noqa: PLW0603
    celery_signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="jobreaper.prerun")
    celery_signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="jobreaper.postrun")
    celery_signals.task_revoked.connect(_on_revoked, weak=False, dispatch_uid="jobreaper.revoked")
    celery_signals.task_failure.connect(_on_failure, weak=False, dispatch_uid="jobreaper.failure")
    celery_signals.worker_process_shutdown.connect(
        _on_process_shutdown, weak=False, dispatch_uid="jobreaper.process_shutdown"
    )
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_at_exit)
