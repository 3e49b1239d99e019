"""The per-process batching writer: a queue of records and the thread that writes it (the
``Tracker``'s base; the subclass's ``_apply`` writes a batch, its ``_report_late`` reports)."""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence

from sqlalchemy.engine import Connection

from ..database import Database
from ..settings import Settings
from .failures import _summary, _transient
from .process import _greened, _keep_inherited
from .records import _Finish, _Record, _Start
from .statements import _AUTOCOMMIT

logger = logging.getLogger("celery_jobreaper.tracking")

#: Seconds between two flushes of a process's writer thread (one transaction each); a record
#: waits at most about twice this long (see ``BatchWriter._take``).
FLUSH_INTERVAL = 0.005
#: Pending records that make the writer write at once, without waiting for the interval.
FLUSH_EARLY = 100
#: Most records written in one transaction (more wait for the next one, written right after).
MAX_BATCH = 1000
#: Most records a process keeps while the database cannot take them; the oldest go beyond it.
MAX_PENDING = 10_000
#: Seconds before the first retry after a failed write; doubles up to ``TRACKING_BACKOFF``.
RETRY_FIRST = 0.5
#: Seconds tracking stays off in a process after a synchronous write failed (so tasks do not
#: each wait for a connect timeout while the database is down); also the longest pause between
#: the writer thread's retries.
TRACKING_BACKOFF = 10.0


class BatchWriter:
    """Queues records and writes them from a writer thread of this process (see ``Tracker``)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self._reset_writer()
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=functools.partial(_after_fork, ref))

    def _apply(self, conn: Connection, records: Sequence[_Record]) -> list[tuple[str, str]]:
        """Write *records* in one transaction; return the late results (the subclass's)."""
        raise NotImplementedError

    def _report_late(self, late: list[tuple[str, str]]) -> None:
        """After the commit: report the late results (the subclass's)."""
        raise NotImplementedError

    @staticmethod
    def _threadless() -> bool:
        """Whether records are written at once, without a writer thread (gevent, eventlet)."""
        return _greened()

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
            if size > MAX_PENDING:
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
        """Drop the oldest pending records beyond :data:`MAX_PENDING` (lock held).

        A batch in flight is older than every pending record, but it cannot be dropped while
        it is written: it is not counted here. If its write fails it goes back to the head of
        the queue, and this runs again (:meth:`_failed`): then it is what is dropped.
        """
        dropped = 0
        while self._pending and len(self._pending) > MAX_PENDING:
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
        """Records queued in this process and not yet written (at most :data:`MAX_PENDING`,
        plus a batch being written)."""
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

    def _close_writer(self) -> None:
        """Flush, then give back the writer's connection (made again when needed)."""
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


def _after_fork(ref: weakref.ref[BatchWriter]) -> None:
    """In a forked child: the parent's queue, lock and writer thread are not ours."""
    tracker = ref()
    if tracker is not None:
        tracker._reset_writer()
