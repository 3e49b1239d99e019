"""The tracker: task signals' records of tracked jobs, written with an owner and a fence."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import exc, select, update
from sqlalchemy.engine import Connection

from .. import ledger
from ..clock import utcnow
from ..database import Database
from ..incarnation import Incarnation
from ..schema import JobReaperTables
from ..settings import Settings
from ..vocabulary import FAILED, RUNNING, SETTLED
from .late import record_late, report_late
from .process import _keep_inherited, _one_task_at_a_time
from .records import _STATUS, _Finish, _Record, _rounds, _Start
from .statements import Statements, _autocommit
from .writer import BatchWriter

if TYPE_CHECKING:
    from ..metrics import Metrics

logger = logging.getLogger("celery_jobreaper.tracking")

_T = TypeVar("_T")


class Tracker(BatchWriter):
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
        self,
        db: Database,
        tables: JobReaperTables,
        settings: Settings,
        me: Incarnation,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        #: counts late results (in the process that ran the task: see :mod:`..metrics`)
        self.metrics = metrics
        self.t = tables.jobs
        self.tables = tables
        self.me = me
        self._fences: dict[str, str] = {}  # task id -> fence token, in the process running it
        self._tracks: dict[str, bool] = {}  # task name -> settings.tracks(name)
        self._held: Connection | None = None  # the connection kept for lost() ...
        self._held_pid = 0  # ... and the process it belongs to
        self._statements = Statements(self.t, tables.incarnations)
        super().__init__(db, settings)

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
        if self._threadless():
            self._write_now([record])  # raises: no fence held, so the end is not recorded
            self._fences[task_id] = fence
            return
        self._fences[task_id] = fence
        self._submit(record)

    def finished(self, task_id: str, state: str | None, error: str | None = None) -> None:
        """Record the task's end, fenced: a settled job is never overwritten by its old owner."""
        fence = self._fences.pop(task_id, None)
        record = _Finish(task_id, fence, _STATUS.get(state or "", FAILED), utcnow(), error)
        if self._threadless():
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
        now = utcnow()
        stmt = (
            update(t)
            .where(t.c.task_id == task_id, t.c.status == RUNNING, t.c.incarnation_id == self.me.id)
            .values(status=status, completed_at=now, error=error, fence=None)
        )
        if status != FAILED:  # revoked: the user's doing, not a settle
            self._write(lambda conn: conn.execute(stmt))
            return
        # A settle like the reaper's: the row and its ledger event in one transaction, the
        # event only if the row really changed (DESIGN §2.3, §2.5).
        with self.db.connect() as conn, conn.begin():
            name = conn.execute(select(t.c.task_name).where(t.c.task_id == task_id)).scalar()
            if conn.execute(stmt).rowcount == 1:
                event = ledger.Event(
                    action=SETTLED,
                    source=t.name,
                    job_id=task_id,
                    reason=error,
                    task_id=task_id,
                    kind=name,
                    previous_status=RUNNING,
                    new_status=FAILED,
                    owner=self.me.node,
                )
                ledger.write(conn, self.tables, [event], now=now, run_id=None)

    # --- writing ----------------------------------------------------------------------------

    def _apply(self, conn: Connection, records: Sequence[_Record]) -> list[tuple[str, str]]:
        """Write *records* in one transaction, in order per task; return the late results.

        The records go in rounds; in each, a task has at most one start (and a finish of the
        same fence merged into it) and one finish, and starts are written before finishes.
        Usually everything is one round, and often only starts (each with its finish merged):
        then the one upsert statement is the transaction (PostgreSQL, MySQL: the connection is
        in autocommit mode, and opens a transaction explicitly when a flush needs more).

        A flush that leaves a job running vouches for it in its transaction, first
        (:meth:`Statements.vouch`): if this incarnation was marked dead, or its heartbeat is
        old enough for a reaper to judge it dead on it, the heartbeat is renewed with the job,
        atomically, so no reaper reads the new running job of a worker declared dead during a
        pause without that proof of life. Otherwise the vouch writes and locks nothing.
        """
        rounds = _rounds(records)
        vouch = any(row["status"] == RUNNING for starts, _ in rounds for row in starts.values())
        revived = [False]
        if not _autocommit(conn):
            with conn.begin():
                late = self._apply_rounds(conn, rounds, revived if vouch else None)
        elif len(rounds) == 1 and not rounds[0][1] and not vouch:
            # One statement: atomic on its own.
            self._statements.upsert(conn, list(rounds[0][0].values()))
            return []
        else:
            late = self._apply_explicitly(conn, rounds, revived if vouch else None)
        if revived[0]:
            logger.warning(
                "jobreaper: this worker (%s) had not heartbeated for a while (paused?): it may "
                "have been declared dead by another reaper meanwhile, and its jobs of that time "
                "settled. Heartbeats resume now.",
                self.me.node,
            )
        return late

    def _apply_explicitly(
        self,
        conn: Connection,
        rounds: list[tuple[dict[str, dict[str, Any]], list[_Finish]]],
        revived: list[bool] | None,
    ) -> list[tuple[str, str]]:
        """The rounds in an explicit transaction on an autocommit connection."""
        if revived is not None and conn.dialect.name in ("mysql", "mariadb"):
            # a vouch matching no row then releases its row lock at once (REPEATABLE READ keeps it)
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        conn.exec_driver_sql("BEGIN")
        try:
            late = self._apply_rounds(conn, rounds, revived)
        except BaseException:
            try:
                conn.exec_driver_sql("ROLLBACK")
            except Exception:  # the connection is broken: the server rolls back
                logger.debug("jobreaper: rolling back tracking records failed", exc_info=True)
            raise
        conn.exec_driver_sql("COMMIT")
        return late

    def _vouch_older_than(self) -> float:
        """Seconds: a heartbeat this old is renewed by a vouch. Below two heartbeat intervals
        (how quiet an earlier start of a node name must be to be judged dead) and below the
        timeout; above one interval (a live heartbeat's usual age)."""
        settings = self.settings
        return min(1.5 * settings.heartbeat_interval, settings.heartbeat_timeout / 2)

    def _apply_rounds(
        self,
        conn: Connection,
        rounds: list[tuple[dict[str, dict[str, Any]], list[_Finish]]],
        revived: list[bool] | None = None,
    ) -> list[tuple[str, str]]:
        """Write the rounds (in the caller's transaction); vouch first unless *revived* is
        ``None`` (whether the vouch undid a dead mark goes into ``revived[0]``)."""
        if revived is not None:
            revived[0] = self._statements.vouch(
                conn, self.me.id, older_than=self._vouch_older_than()
            )
        late: list[tuple[str, str]] = []
        for starts, finishes in rounds:
            if starts:
                self._statements.upsert(conn, list(starts.values()))
            if finishes:
                late += self._statements.complete(conn, finishes)
        if late:
            record_late(conn, self.tables, self.me, late)
        return late

    def _report_late(self, late: list[tuple[str, str]]) -> None:
        report_late(self, self.me.node, late, source=self.tables.jobs.name)
        if self.metrics is not None and late:
            self.metrics.late_results(self.tables.jobs.name, len(late))

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
        self._close_writer()
