"""Pure decisions: which candidate jobs are stale, and why. No I/O happens here."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from .clock import as_naive_utc, format_age
from .liveness import LivenessView
from .settings import Settings
from .sources.base import Candidate

Verdict = Literal["fail", "leave"]

# Reasons and error texts, defined once: the set-based path of :mod:`celery_jobreaper.bulk`
# builds the same texts in SQL from these.
#: Left alone: a job without owner that started less than ``jobreaper_grace`` ago.
YOUNGER_THAN_GRACE = "younger than jobreaper_grace"
#: Failed: a job without owner while no other worker is alive.
NO_LIVE_WORKER_LEFT = "with no live worker left that could be running it"
#: Left alone: a job without owner, other live workers, and no (exceeded) ``jobreaper_max_age``.
UNOWNED_WHILE_WORKERS_LIVE = (
    "no owner recorded and other live workers may be running it (set jobreaper_max_age)"
)


def policy_ignored(kind: str | None) -> str:
    """Reason for leaving a job whose kind has the policy 'ignore'."""
    return f"policy 'ignore' for {kind}"


def older_than_max_age(max_age: float) -> str:
    """Reason (the *where* part) for failing a job older than ``jobreaper_max_age``."""
    return f"older than jobreaper_max_age ({max_age:g} s)"


def failure_error(status: str, age: str | None, where: str) -> str:
    """The error text stored on a failed job: its status, its age (if known) and *where*."""
    running = f"was {status} for {age}" if age is not None else f"was {status}"
    return (
        f"Job reset by jobreaper: it {running} {where}. This usually means the worker was "
        "killed (SIGKILL, out of memory, eviction, deploy) while the job was in progress."
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one candidate, with the reason shown in logs, the ledger and dry runs."""

    candidate: Candidate
    verdict: Verdict
    reason: str  #: short, groupable reason (for "left alone" counts and the ledger)
    error: str | None = None  #: the error text to store on a failed job


def plan(candidates: Iterable[Candidate], view: LivenessView, settings: Settings) -> list[Decision]:
    """Decide every candidate; see DESIGN §2 and §4 for the rules."""
    return [decide(c, view, settings) for c in candidates]


def decide(c: Candidate, view: LivenessView, settings: Settings) -> Decision:
    """Decide one candidate."""
    if settings.policy_for(c.kind) == "ignore":
        return Decision(c, "leave", policy_ignored(c.kind))
    if c.task_id is not None and c.task_id in view.live_task_ids:
        return Decision(c, "leave", "task is active, reserved or scheduled on a live worker")
    if c.task_id is not None and view.queued_task_ids and c.task_id in view.queued_task_ids:
        return Decision(c, "leave", "its message is still waiting in a queue")
    if c.owner is not None and c.owner in view.refused_nodes:
        return Decision(c, "leave", f"refused: {view.refused_nodes[c.owner]}")
    if c.incarnation_id is not None:
        dead = view.dead_incarnations.get(c.incarnation_id)
        if dead is not None and c.incarnation_id not in view.live_incarnations:
            return _fail(c, view, f"on {dead}")
        return Decision(c, "leave", "owner worker is alive")
    if c.owner is not None:
        if view.node_is_me(c.owner):
            assert view.me is not None
            started = None if c.started_at is None else as_naive_utc(c.started_at)
            if started is None or started < view.me.started_at:
                return _fail(c, view, f"on {c.owner} (an earlier start of this worker)")
            return Decision(c, "leave", "owned by this worker's current start")
        if c.owner in view.dead_nodes:
            return _fail(c, view, f"on {view.dead_nodes[c.owner]}")
        if c.owner in view.live_nodes:
            return Decision(c, "leave", "owner worker is alive")
        old = _older_than_max_age(c, view.now, settings)
        if old:
            return _fail(c, view, f"on {c.owner}; {old}")
        return Decision(
            c, "leave", "owner unknown to jobreaper and not provably dead (set jobreaper_max_age)"
        )
    age = _age(c, view.now)
    if age is not None and age < timedelta(seconds=settings.grace):
        return Decision(c, "leave", YOUNGER_THAN_GRACE)
    if view.other_live_workers == 0:
        return _fail(c, view, NO_LIVE_WORKER_LEFT)
    old = _older_than_max_age(c, view.now, settings)
    if old:
        return _fail(c, view, old)
    return Decision(c, "leave", UNOWNED_WHILE_WORKERS_LIVE)


def _age(c: Candidate, now: datetime) -> timedelta | None:
    return None if c.started_at is None else now - as_naive_utc(c.started_at)


def _older_than_max_age(c: Candidate, now: datetime, settings: Settings) -> str | None:
    age = _age(c, now)
    if settings.max_age is None or age is None or age <= timedelta(seconds=settings.max_age):
        return None
    return older_than_max_age(settings.max_age)


def _fail(c: Candidate, view: LivenessView, where: str) -> Decision:
    age = _age(c, view.now)
    error = failure_error(c.status, None if age is None else format_age(age), where)
    return Decision(c, "fail", where, error)
