"""The ``jobreaper`` remote-control command: ``celery -A proj inspect jobreaper``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from celery.worker.control import control_command, inspect_command

if TYPE_CHECKING:
    from .step import JobReaperStep

#: Words that ask ``control jobreaper_reap`` for a dry run (``celery control`` passes
#: arguments as words: ``celery -A proj control jobreaper_reap dry-run``).
DRY_RUN_WORDS = frozenset({"dry-run", "--dry-run", "dry_run", "true", "yes", "1"})
REAL_RUN_WORDS = frozenset({"false", "no", "0"})


def _step(state: Any) -> JobReaperStep | None:
    """This worker's jobreaper bootstep, if it has one."""
    from .step import JobReaperStep

    for step in getattr(state.consumer.controller, "steps", ()):
        if isinstance(step, JobReaperStep):
            return step
    return None


def _dry_run(value: Any) -> bool | None:
    """A dry run or not, from a bool or a word; ``None`` if *value* is neither."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in DRY_RUN_WORDS or word in REAL_RUN_WORDS:
        return word in DRY_RUN_WORDS
    return None


def dry_run_word(value: Any) -> bool:
    """``celery control jobreaper_reap``'s argument, read by the ``celery`` command line."""
    dry = _dry_run(value)
    if dry is None:
        raise click.BadParameter(f"jobreaper_reap takes 'dry-run' or nothing, not {value!r}")
    return dry


@inspect_command()
def jobreaper(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Return this worker's jobreaper status and its last reap report."""
    step = _step(state)
    if step is None:
        return {"enabled": False}
    return dict(step.info(state.consumer.controller)["jobreaper"])


@control_command(args=[("dry_run", dry_run_word)], signature="[dry-run]")
def jobreaper_reap(
    state: Any,
    dry_run: Any = False,
    requester: str | None = None,
    reply_to: dict[str, str] | None = None,
    ticket: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Reap now on this worker (``dry-run``: only plan); replies that the reap was queued.

    The reap runs in jobreaper's own thread, never on the consumer. ``celery -A proj
    jobreaper reap --on NODE`` passes *reply_to* and *ticket*: the report is sent there too.
    """
    from .remote import ReapRequest

    step = _step(state)
    if step is None:
        return {"error": "jobreaper is not installed on this worker"}
    dry = _dry_run(dry_run)
    if dry is None:
        return {"error": f"jobreaper_reap takes 'dry-run' or nothing, not {dry_run!r}"}
    request = ReapRequest(
        dry_run=dry,
        requester=requester or "a remote-control client that did not say who it is",
        reply_to=reply_to,
        ticket=ticket,
    )
    return step.request_reap(request)


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
    step = _step(state)
    if step is None:
        return {"ok": "pong", "incarnation": None, "reaps": False}
    return {"ok": "pong", "incarnation": step.incarnation_id, "reaps": bool(step.reaps)}
