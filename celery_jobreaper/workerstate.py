"""Celery's in-process worker state, read and written safely from jobreaper's own threads."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def snapshot(collection: Iterable[Any]) -> set[Any]:
    """Copy a set the worker's main thread may be changing right now (we run in another)."""
    for _ in range(100):
        try:
            return set(collection)
        except RuntimeError:  # changed size during iteration: try again
            continue
    return set()


def _copy(collection: Iterable[Any]) -> list[Any]:
    """Copy *collection* from another thread; raises if it never holds still (no guess)."""
    for _ in range(100):
        try:
            return list(collection)
        except RuntimeError:  # changed during iteration: try again
            continue
    raise RuntimeError("jobreaper: the worker's task state kept changing while being read")


def held_task_ids(consumer: Any = None) -> set[str]:
    """Tasks this worker process holds: active, reserved, scheduled (ETA) and rate-limited.

    Read in-process from :mod:`celery.worker.state` (no broadcast): ``requests`` (every
    reserved, scheduled or active request by id), ``reserved_requests``, ``active_requests``
    and ``scheduled_requests``. Celery keeps a rate-limited request without ETA only in its
    task's token bucket on the consumer (``Consumer.task_buckets``) until a token frees up,
    so the buckets of *consumer* are read too, and its timer (ETA requests, which Celery
    before 5.7 keeps only there: :func:`timer_request_ids`).
    """
    from celery.worker import state as worker_state

    ids: set[str] = set(_copy(worker_state.requests))
    for requests in (
        worker_state.reserved_requests,
        worker_state.active_requests,
        getattr(worker_state, "scheduled_requests", ()),
    ):
        ids.update(r.id for r in _copy(requests))
    buckets = getattr(consumer, "task_buckets", None)
    if buckets:
        for bucket in _copy(buckets.values()):
            for entry in _copy(getattr(bucket, "contents", None) or ()):
                request = entry[0] if isinstance(entry, tuple) else entry
                task_id = getattr(request, "id", None)
                if task_id is not None:
                    ids.add(task_id)
    ids |= timer_request_ids(consumer)
    return ids


def timer_request_ids(consumer: Any) -> set[str]:
    """Task ids of requests waiting on the consumer's timer for their ETA/countdown.

    Celery before 5.7 keeps such a request only in the timer entry (``apply_eta_task`` or,
    rate-limited, ``limit_post_eta``, the request first among its arguments), not in
    ``worker_state.requests``; this reads the timer as Celery's own ``inspect scheduled`` does.
    """
    from celery.worker.request import Request

    timer = getattr(consumer, "timer", None)
    schedule = getattr(timer, "schedule", None)
    if schedule is None:
        return set()
    found: set[str] = set()
    for waiting in _copy(schedule.queue):
        args = getattr(getattr(waiting, "entry", None), "args", None) or ()
        first = args[0] if isinstance(args, (tuple, list)) and args else None
        if isinstance(first, Request) and isinstance(first.id, str):
            found.add(first.id)
    return found


def held_by(worker: Any) -> Callable[[], set[str]]:
    """The task ids *worker* (a Celery ``WorkController``, in its own process) holds."""

    def held() -> set[str]:
        return held_task_ids(getattr(worker, "consumer", None))

    return held


def revoked_ids() -> set[str]:
    """This process's in-memory revoked task ids."""
    from celery.worker import state as worker_state

    return snapshot(worker_state.revoked)


#: Ids this process holds revoked because their job was settled (not because a user revoked
#: them): forgotten again once the settled run's message is gone (see :func:`keep_settled`).
_settled: set[str] = set()


def remember_settled(task_ids: Iterable[str]) -> None:
    """Revoke settled jobs' task ids in this process, as settled (forgotten later)."""
    ids = set(task_ids)
    _settled.update(ids)
    remember_revoked(ids)


def keep_settled(still: Iterable[str]) -> set[str]:
    """Forget the settled ids not in *still* (no longer revoked in the table); return them."""
    from celery.worker import state as worker_state

    gone = _settled - set(still)
    for task_id in gone:
        worker_state.revoked.discard(task_id)
    _settled.difference_update(gone)
    return gone


def settled_ids() -> set[str]:
    """The ids this process holds revoked only because their job was settled."""
    return set(_settled)


def remember_revoked(task_ids: Iterable[str]) -> None:
    """Add *task_ids* to this process's revoked set, so a worker discards their messages."""
    from celery.worker import state as worker_state

    for task_id in task_ids:
        if task_id not in worker_state.revoked:
            worker_state.revoked.add(task_id)
