"""The ``jobreaper`` remote-control command: ``celery -A proj inspect jobreaper``."""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command


@inspect_command()
def jobreaper(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Return this worker's jobreaper status and its last reap report."""
    from .step import JobReaperStep

    controller = state.consumer.controller
    for step in getattr(controller, "steps", ()):
        if isinstance(step, JobReaperStep):
            return dict(step.info(controller)["jobreaper"])
    return {"enabled": False}


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
