"""Checked again with a batch's rows locked, before it commits: did a worker appear, did an
owner found dead show life, or did this worker take a task, since the run judged who is
alive? Then decisions that rested on "no live worker", on that owner's death (or on this
worker being idle) no longer hold."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import false, or_, select

from .liveness import newcomers
from .livenessview import LivenessView
from .planner import Decision
from .rules import NO_LIVE_WORKER_LEFT
from .schema import JobReaperTables
from .settled import Tally
from .textsafe import safe
from .vocabulary import EARLIER_START, OWNER_DEAD, OWNER_NEVER_REGISTERED

logger = logging.getLogger(__name__)

#: Left alone: a job without owner while a worker registered (or came back) during the reap.
WORKER_APPEARED = (
    "a worker registered or came back during the reap; judged again next time (it may be "
    "running it)"
)


#: Left alone: a job whose owner, found dead by the run, heartbeated (or registered) since.
OWNER_CAME_BACK = (
    "its owner, found dead, heartbeated or registered again during the reap (back from a "
    "pause); judged again next time"
)

#: Causes of failures that rest on the owner's death (its silence since the run's look).
_ON_OWNERS_DEATH = frozenset({OWNER_DEAD, EARLIER_START, OWNER_NEVER_REGISTERED})


def owners_back(
    conn: Any, tbls: JobReaperTables, view: LivenessView, fails: list[Decision]
) -> set[Any]:
    """Job ids of *fails* whose owner showed life since *view* judged it dead.

    Read in the apply transaction (again once the rows are locked): the owner's incarnation
    (a tracked job) or any incarnation of its node name (an owner column; this worker's own
    excepted) with a heartbeat other than the one the view read, or one the view did not see
    (registered since). Compared by the stored value, not by time. A worker woken from a pause
    heartbeats before (or, tracked, together with) writing new jobs: a verdict made before that
    heartbeat does not hold for any job of it.
    """
    relying = [d for d in fails if d.cause in _ON_OWNERS_DEATH]
    if not relying:
        return set()
    ids = {d.candidate.incarnation_id for d in relying if d.candidate.incarnation_id}
    nodes = {d.candidate.owner for d in relying if not d.candidate.incarnation_id}
    nodes.discard(None)
    t = tbls.incarnations
    rows = conn.execute(
        select(t.c.id, t.c.node, t.c.heartbeat_at).where(
            or_(
                t.c.id.in_(ids) if ids else false(),
                t.c.node.in_(nodes) if nodes else false(),
            )
        )
    )
    mine = view.me.id if view.me is not None else None
    back_ids: set[str] = set()
    back_nodes: set[str] = set()
    for r in rows:
        if r.id != mine and view.seen_heartbeats.get(r.id) != r.heartbeat_at:
            back_ids.add(r.id)
            back_nodes.add(r.node)
    if not back_ids:
        return set()
    back = {
        d.candidate.job_id
        for d in relying
        if (d.candidate.incarnation_id in back_ids)
        or (not d.candidate.incarnation_id and d.candidate.owner in back_nodes)
    }
    if back:
        logger.info(
            "jobreaper: %s, found dead, showed life during the reap; %d of its job(s) are "
            "judged again next time",
            ", ".join(sorted(safe(n) for n in back_nodes)),
            len(back),
        )
    return back


def owners_still_silent(
    conn: Any, tbls: JobReaperTables, view: LivenessView, fails: list[Decision], tally: Tally
) -> list[Decision]:
    """*fails*, less those whose owner showed life since *view* (:func:`owners_back`)."""
    back = owners_back(conn, tbls, view, fails)
    if not back:
        return fails
    tally.left_alone[OWNER_CAME_BACK] += len(back)
    return [d for d in fails if d.candidate.job_id not in back]


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
