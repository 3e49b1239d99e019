"""Tracked jobs: task signals write ``jobreaper_jobs`` with an owner incarnation and a fence."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import signals as celery_signals
from celery.exceptions import WorkerLostError
from sqlalchemy import exc, insert, update

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


class Tracker:
    """Writes tracked-job rows from task signals; one per worker process tree."""

    def __init__(
        self, db: Database, tables: JobReaperTables, settings: Settings, me: Incarnation
    ) -> None:
        self.db = db
        self.t = tables.jobs
        self.tables = tables
        self.settings = settings
        self.me = me
        self._fences: dict[str, str] = {}  # task id -> fence token, in the process running it

    def started(self, task_id: str, task_name: str, node: str | None) -> None:
        """Record that this process started *task_id*; remember the fence it holds."""
        fence = uuid.uuid4().hex
        now = utcnow()
        values = {
            "task_name": task_name,
            "status": RUNNING,
            "incarnation_id": self.me.id,
            "node": node or self.me.node,
            "started_at": now,
            "completed_at": None,
            "error": None,
            "fence": fence,
        }
        try:
            with self.db.connect() as conn, conn.begin():
                conn.execute(insert(self.t).values(task_id=task_id, times_reaped=0, **values))
        except exc.IntegrityError:  # a retry or redelivery of a known task id
            with self.db.connect() as conn, conn.begin():
                conn.execute(update(self.t).where(self.t.c.task_id == task_id).values(**values))
        self._fences[task_id] = fence

    def finished(self, task_id: str, state: str | None, error: str | None = None) -> None:
        """Record the task's end, fenced: a settled job is never overwritten by its old owner."""
        fence = self._fences.pop(task_id, None)
        status = _STATUS.get(state or "", FAILED)
        t = self.t
        with self.db.connect() as conn, conn.begin():
            where = [t.c.task_id == task_id, t.c.status == RUNNING]
            if fence is not None:
                where.append(t.c.fence == fence)
            changed = conn.execute(
                update(t)
                .where(*where)
                .values(status=status, completed_at=utcnow(), error=error, fence=None)
            ).rowcount
            if changed or fence is None:
                return
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
        with self.db.connect() as conn, conn.begin():
            conn.execute(
                update(self.t)
                .where(
                    self.t.c.task_id == task_id,
                    self.t.c.status == RUNNING,
                    self.t.c.incarnation_id == self.me.id,
                )
                .values(
                    status=FAILED if "WorkerLost" in error else REVOKED,
                    completed_at=utcnow(),
                    error=error,
                    fence=None,
                )
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
    if not tracker.settings.tracks(task.name):
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
