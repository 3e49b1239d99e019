"""Celery's task signals connected to the process-wide tracker (set by the bootstep)."""

from __future__ import annotations

import atexit
import logging
import time
from typing import Any

from celery import signals as celery_signals
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from ..vocabulary import FAILED, REVOKED
from .tracker import Tracker
from .writer import TRACKING_BACKOFF

logger = logging.getLogger("celery_jobreaper.tracking")

_tracker: Tracker | None = None


def set_tracker(tracker: Tracker | None) -> None:
    """Install the process-wide tracker (inherited by forked pool processes)."""
    global _tracker  # noqa: PLW0603
    _tracker = tracker


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
