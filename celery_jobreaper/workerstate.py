"""Celery's in-process worker state, read and written safely from jobreaper's own threads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def snapshot(collection: Iterable[Any]) -> set[Any]:
    """Copy a set the worker's main thread may be changing right now (we run in another)."""
    for _ in range(100):
        try:
            return set(collection)
        except RuntimeError:  # changed size during iteration: try again
            continue
    return set()


def held_task_ids() -> set[str]:
    """Tasks this process holds (active, reserved, scheduled) when it is a worker."""
    from celery.worker import state as worker_state

    held = snapshot(worker_state.reserved_requests) | snapshot(worker_state.active_requests)
    held |= snapshot(getattr(worker_state, "scheduled_requests", ()))
    return {r.id for r in held}


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
