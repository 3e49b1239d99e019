"""The ``jobreaper`` remote-control command: ``celery -A proj inspect jobreaper``."""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command


@inspect_command()
def jobreaper(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Return this worker's jobreaper status and its last reap report."""
    from .step import JobReaperStep

    controller = state.consumer.controller
    for step in getattr(controller, "steps", ()):
        if isinstance(step, JobReaperStep):
            return dict(step.info(controller)["jobreaper"])
    return {"enabled": False}


@control_command(visible=False)
def jobreaper_revoke_settled(state: Any, ids: list[str] | None = None, **kwargs: Any) -> None:
    """Revoke settled jobs' task ids here until their message is gone (then forgotten)."""
    from .workerstate import remember_settled

    remember_settled(ids or ())


@inspect_command(visible=False)
def jobreaper_held(
    state: Any, tags: list[str] | None = None, ids: list[str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Which of these Redis ``unacked`` delivery tags and task ids this worker holds.

    Asked by the broker sweep of every jobreaper worker before it restores or drops an
    ``unacked`` entry (see :mod:`celery_jobreaper.broker.holders`).
    """
    from .broker.holders import held_here

    return held_here(state.consumer, tags or (), ids or ())


@inspect_command(name="jobreaper_ping")
def jobreaper_ping(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Answer a ping with this worker's incarnation id (``None`` if it has none).

    A reaper pinging its own node name tells its own process's reply from another's by it.
    """
    from .step import JobReaperStep

    controller = state.consumer.controller
    for step in getattr(controller, "steps", ()):
        if isinstance(step, JobReaperStep):
            return {"ok": "pong", "incarnation": step.incarnation_id}
    return {"ok": "pong", "incarnation": None}
