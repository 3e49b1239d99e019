"""Checked again with a batch's rows locked, before it commits: did a worker appear, or did
this worker take a task, since the run judged who is alive? Then decisions that rested on
"no live worker" (or on this worker being idle) no longer hold."""

from __future__ import annotations

import logging
from typing import Any

from .liveness import LivenessView, newcomers
from .planner import Decision
from .rules import NO_LIVE_WORKER_LEFT
from .schema import JobReaperTables
from .settled import Tally
from .textsafe import safe

logger = logging.getLogger(__name__)

#: Left alone: a job without owner while a worker registered (or came back) during the reap.
WORKER_APPEARED = (
    "a worker registered or came back during the reap; judged again next time (it may be "
    "running it)"
)


def log_newcomers(came: list[str]) -> None:
    """Say that a worker appeared during the reap (its ownerless jobs wait for the next)."""
    logger.info(
        "jobreaper: %s registered or heartbeated during the reap; jobs without owner are "
        "judged again next time",
        ", ".join(safe(c) for c in came),
    )


def still_alone(
    conn: Any, tbls: JobReaperTables, view: LivenessView, fails: list[Decision], tally: Tally
) -> list[Decision]:
    """*fails*, less those that rest on "no live worker" if a worker appeared since *view*.

    Read in the apply transaction, after the batch was read: a worker registers before it
    consumes, so one that ran a job of the batch had registered before the batch was read
    and is seen here (SQLite's ``BEGIN IMMEDIATE`` holds every writer off meanwhile). Read
    again once the rows are locked (:func:`appeared_since`).
    """
    relying = [d for d in fails if d.reason == NO_LIVE_WORKER_LEFT]
    if not relying:
        return fails
    came = newcomers(conn, tbls, view)
    if not came:
        return fails
    log_newcomers(came)
    tally.left_alone[WORKER_APPEARED] += len(relying)
    return [d for d in fails if d.reason != NO_LIVE_WORKER_LEFT]


def appeared_since(
    conn: Any, tbls: JobReaperTables, view: LivenessView, done: list[Decision]
) -> bool:
    """Whether, with the rows of *done* locked and changed, a worker is seen now that was
    not when :func:`still_alone` looked (then the whole batch is undone, and judged again
    next run): nothing a worker did after that look can be missed."""
    if not any(d.reason == NO_LIVE_WORKER_LEFT for d in done):
        return False
    came = newcomers(conn, tbls, view)
    if came:
        log_newcomers(came)
    return bool(came)


def took_task_since(held: set[str] | None, fails: list[Decision]) -> bool:
    """Whether this worker took, since the plan, a task that may run one of *fails*.

    *held*: the tasks this worker holds now (``None``: not a worker). Checked with the rows
    locked, before the commit: a job without task id failed because no worker at all could
    run it, or owned by this node name while this worker held no task, while this worker now
    holds some task; or a job whose task this worker now holds.
    """
    if not held:
        return False
    took = any(d.candidate.task_id in held for d in fails if d.candidate.task_id) or any(
        d.while_idle for d in fails
    )
    if took:
        logger.info(
            "jobreaper: this worker took a task during the reap; those jobs are judged "
            "again next time"
        )
    return took
