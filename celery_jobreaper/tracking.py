"""Tracked jobs: task signals write ``jobreaper_jobs`` with an owner incarnation and a fence."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from celery import signals as celery_signals
from celery.exceptions import WorkerLostError
from sqlalchemy import bindparam, exc, insert, update
from sqlalchemy.engine import Connection

from . import signals
from .apply import record_events
from .clock import utcnow
from .database import Database
from .liveness import Incarnation
from .planner import Decision
from .schema import JobReaperTables
from .settings import Settings
from .sources.base import Candidate
from .sources.tracked import FAILED, RETRY, REVOKED, RUNNING, SUCCEEDED

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


class Tracker:
    """Writes tracked-job rows from task signals; one per worker process tree.

    Every write is one statement in autocommit mode (its own transaction: the fenced
    completion is a single compare-and-set ``UPDATE``). Where a thread runs one task at a time
    (prefork pool processes, solo) it keeps one connection for these writes instead of checking
    one out (and pinging it) for each; elsewhere (``-P threads``, gevent, eventlet) each write
    checks one out.
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
        self._held: Connection | None = None  # the connection kept for the writes ...
        self._held_pid = 0  # ... and the process it belongs to
        t = self.t
        self._insert = insert(t)
        self._restart = update(t).where(t.c.task_id == bindparam("jr_task_id"))
        self._finish = update(t).where(
            t.c.task_id == bindparam("jr_task_id"), t.c.status == RUNNING
        )
        self._finish_fenced = self._finish.where(t.c.fence == bindparam("jr_fence"))

    def tracks(self, task_name: str) -> bool:
        """Whether tasks of this name are tracked (``jobreaper_track_task_names``), cached."""
        tracked = self._tracks.get(task_name)
        if tracked is None:
            tracked = self._tracks[task_name] = self.settings.tracks(task_name)
        return tracked

    def started(self, task_id: str, task_name: str, node: str | None) -> None:
        """Record that this process started *task_id*; remember the fence it holds."""
        fence = uuid.uuid4().hex
        values = {
            "task_name": task_name,
            "status": RUNNING,
            "incarnation_id": self.me.id,
            "node": node or self.me.node,
            "started_at": utcnow(),
            "completed_at": None,
            "error": None,
            "fence": fence,
        }

        def write(conn: Connection) -> None:
            try:
                conn.execute(self._insert, {"task_id": task_id, "times_reaped": 0, **values})
            except exc.IntegrityError:  # a retry or redelivery of a known task id
                conn.execute(self._restart, {"jr_task_id": task_id, **values})

        self._write(write)
        self._fences[task_id] = fence

    def finished(self, task_id: str, state: str | None, error: str | None = None) -> None:
        """Record the task's end, fenced: a settled job is never overwritten by its old owner."""
        fence = self._fences.pop(task_id, None)
        status = _STATUS.get(state or "", FAILED)
        values = {
            "jr_task_id": task_id,
            "status": status,
            "completed_at": utcnow(),
            "error": error,
            "fence": None,
        }

        def write(conn: Connection) -> bool:
            if fence is None:
                conn.execute(self._finish, values)
                return True
            # One statement: applies only while the row still holds our fence.
            if conn.execute(self._finish_fenced, {**values, "jr_fence": fence}).rowcount:
                return True
            # The job was settled (or taken over) while we ran: keep what the reaper wrote.
            decision = Decision(
                Candidate(
                    self.t.name, task_id, RUNNING, None, None, self.me.node, self.me.id, task_id
                ),
                "leave",
                f"late result {status!r} from {self.me.node} after the job was settled; "
                "not applied",
            )
            record_events(
                conn,
                self.tables,
                [decision],
                now=utcnow(),
                run_id=None,
                new_status=status,
                action=LATE_RESULT,
            )
            return False

        if self._write(write):
            return
        logger.warning(
            "jobreaper: late result for task %s: %s finished it as %s after it had been "
            "settled; the settled row was kept and the late result recorded in the ledger",
            task_id,
            self.me.node,
            status,
        )
        signals.late_result.send(sender=self, task_id=task_id, status=status, node=self.me.node)

    def lost(self, task_id: str, error: str) -> None:
        """The main process saw the task end without its pool process (revoked, worker lost)."""
        self._fences.pop(task_id, None)
        t = self.t
        stmt = (
            update(t)
            .where(t.c.task_id == task_id, t.c.status == RUNNING, t.c.incarnation_id == self.me.id)
            .values(
                status=FAILED if "WorkerLost" in error else REVOKED,
                completed_at=utcnow(),
                error=error,
                fence=None,
            )
        )
        self._write(lambda conn: conn.execute(stmt))

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
                self.close()
                if error.connection_invalidated and attempt == 1:
                    continue  # the server went away since the last write: reconnect once
                raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> Connection:
        pid = os.getpid()
        if self._held is not None and self._held_pid != pid:
            self._held = None  # inherited from the parent through fork: never touch it
        if self._held is None:
            self._held = self.db.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._held_pid = pid
        return self._held

    def close(self) -> None:
        """Give back this process's tracking connection (it is made again when needed)."""
        held, self._held = self._held, None
        if held is not None and self._held_pid == os.getpid():
            try:
                held.close()
            except Exception:  # already broken: nothing to give back
                logger.debug("jobreaper: closing the tracking connection failed", exc_info=True)


def _one_task_at_a_time() -> bool:
    """Whether this thread runs tasks one after another (prefork child, solo, main process).

    Not with ``-P threads`` (tasks run in other threads) nor with gevent/eventlet, where
    greenlets of one thread interleave tasks.
    """
    return threading.current_thread() is threading.main_thread() and not (
        "gevent" in sys.modules or "eventlet" in sys.modules
    )


_tracker: Tracker | None = None


def set_tracker(tracker: Tracker | None) -> None:
    """Install the process-wide tracker (inherited by forked pool processes)."""
    global _tracker  # noqa: PLW0603
    _tracker = tracker


def current_tracker() -> Tracker | None:
    """The tracker of this worker, if tracking is on."""
    return _tracker


#: Seconds tracking stays off in a process after the database failed (so tasks do not each
#: wait for a connect timeout while it is down).
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
    _guard("the revoke", request.id, tracker.lost, request.id, "revoked and terminated")


def _on_failure(
    sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
) -> None:
    tracker = _tracker
    if tracker is None or task_id is None or not isinstance(exception, WorkerLostError):
        return
    _guard("the loss", task_id, tracker.lost, task_id, f"WorkerLostError: {exception}")


def connect_signals() -> None:
    """Connect the task signals once per process (idempotent)."""
    celery_signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="jobreaper.prerun")
    celery_signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="jobreaper.postrun")
    celery_signals.task_revoked.connect(_on_revoked, weak=False, dispatch_uid="jobreaper.revoked")
    celery_signals.task_failure.connect(_on_failure, weak=False, dispatch_uid="jobreaper.failure")
