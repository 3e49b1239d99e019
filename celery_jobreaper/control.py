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
