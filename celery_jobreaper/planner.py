"""Pure decisions: which candidate jobs are stale, and why. No I/O happens here."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal

from .clock import as_naive_utc, format_age
from .livenessview import LivenessView
from .rules import (
    NO_LIVE_WORKER_LEFT,
    START_UNKNOWN_SEEN_BRIEFLY,
    UNOWNED_WHILE_WORKERS_LIVE,
    YOUNGER_THAN_GRACE,
    YOUNGER_THAN_HEARTBEAT_TIMEOUT,
    OwnerlessRule,
    older_than_max_age,
)
from .settings import Settings
from .sources.base import Candidate
from .vocabulary import (
    EARLIER_START,
    MAX_AGE,
    NO_LIVE_WORKER,
    OWN_JOB_NOT_RUNNING,
    OWNER_DEAD,
    OWNER_NEVER_REGISTERED,
    POOL_PROCESS_LOST_CAUSE,
)

__all__ = [
    "NO_LIVE_WORKER_LEFT",
    "OWNER_MAY_HAVE_WOKEN",
    "START_UNKNOWN_SEEN_BRIEFLY",
    "UNOWNED_WHILE_WORKERS_LIVE",
    "YOUNGER_THAN_GRACE",
    "YOUNGER_THAN_HEARTBEAT_TIMEOUT",
    "Decision",
    "TaskFacts",
    "decide",
    "failure_error",
    "older_than_max_age",
    "plan",
    "policy_ignored",
]

Verdict = Literal["fail", "leave"]

#: Left alone: the task is held by this worker or a live peer.
TASK_HELD = "task is active, reserved, scheduled or rate-limited on a live worker"
#: Failed: the owner never registered with jobreaper and did not answer a ping.
NEVER_REGISTERED = (
    "a node never registered with jobreaper (no heartbeat) that does not answer a ping"
)
#: Left alone: a result row in ``RETRY`` (its retry message holds the task, wherever it waits).
RETRY_PENDING = (
    "a retry is pending: its message holds the task (judged only past jobreaper_max_age)"
)
#: Left alone: the task's message waits in a queue.
TASK_QUEUED = "its message is still waiting in a queue"
#: Failed: a row of this worker's current start whose task this worker no longer holds.
POOL_PROCESS_LOST = (
    "its task is no longer held by this worker (the pool process running it died: "
    "out of memory, hard time limit, killed)"
)
#: Failed: a row of this node name without task id, of this worker's current start (by the
#: clocks), while this worker holds no task at all.
HOLDS_NO_TASK = (
    "this worker holds no task, so none of its tasks is running it (the pool process running "
    "it died: out of memory, hard time limit, killed)"
)
#: Left alone: a job of an owner found dead that started after the owner's last heartbeat and
#: is younger than the heartbeat timeout: the owner may have been woken from a pause (marked
#: dead meanwhile) and written it before its next heartbeat; a live owner heartbeats before the
#: job is that old.
OWNER_MAY_HAVE_WOKEN = (
    "owner found dead, but the job started after the owner's last heartbeat and is younger "
    "than jobreaper_heartbeat_timeout: the owner may be back from a pause (judged again later)"
)
#: Left alone: a row of this node name without task id while this worker holds tasks.
MAYBE_MINE = (
    "owned by this node name and this worker holds tasks: one of them may be running it "
    "(judged when it holds none; or set jobreaper_max_age)"
)


def policy_ignored(kind: str | None) -> str:
    """Reason for leaving a job whose kind has the policy 'ignore'."""
    return f"policy 'ignore' for {kind}"


def failure_error(status: str, age: str | None, where: str) -> str:
    """The error text stored on a failed job: its status, its age (if known) and *where*."""
    running = f"was {status} for {age}" if age is not None else f"was {status}"
    return (
        f"Job reset by jobreaper: it {running} {where}. This usually means the worker was "
        "killed (SIGKILL, out of memory, eviction, deploy) while the job was in progress."
    )


@dataclasses.dataclass(frozen=True, slots=True)
class TaskFacts:
    """What one batch knows about tasks, read after the batch's rows (one value per batch)."""

    #: every task id this worker process holds (active, reserved, scheduled, rate-limited)
    held_here: frozenset[str] = frozenset()
    #: of the batch's task ids, those a live peer holds (its ``jobreaper_held`` reply)
    held_by_peers: frozenset[str] = frozenset()
    #: task ids whose messages wait in this worker's queues
    queued: frozenset[str] = frozenset()
    #: of the batch's jobs without owner whose start is unknown, when this reaper first saw
    #: each (job id -> naive UTC, database time; :mod:`~celery_jobreaper.sightings`)
    first_seen: Mapping[Any, datetime] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )

    def ownerless_rule(self, view: LivenessView, settings: Settings) -> OwnerlessRule:
        """The rule for jobs without owner under these facts."""
        return OwnerlessRule.of(
            other_live_workers=view.other_live_workers,
            held_here=bool(self.held_here),
            grace=settings.grace,
            max_age=settings.max_age,
            heartbeat_timeout=settings.heartbeat_timeout,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one candidate, with the reason shown in logs, the ledger and dry runs."""

    candidate: Candidate
    verdict: Verdict
    reason: str  #: short, groupable reason (for "left alone" counts and the ledger)
    error: str | None = None  #: the error text to store on a failed job
    #: a failure that holds only while this worker holds no task (a job without task id that
    #: no task of this worker runs): checked again before the commit
    while_idle: bool = False
    #: a failure of a job with a task id that holds only if its message waits in no queue
    #: (no owner known, or this worker's own job it no longer holds): left alone when the
    #: queues cannot be read (RabbitMQ)
    unqueued: bool = False
    #: why a failure fails, as one of :data:`~celery_jobreaper.vocabulary.CAUSES` (``""`` for
    #: a job left alone): the metrics' label, where *reason* names nodes
    cause: str = ""


def plan(
    candidates: Iterable[Candidate], view: LivenessView, facts: TaskFacts, settings: Settings
) -> list[Decision]:
    """Decide every candidate; see DESIGN §2 and §4 for the rules."""
    rule = facts.ownerless_rule(view, settings)
    return [decide(c, view, facts, settings, rule) for c in candidates]


def decide(
    c: Candidate,
    view: LivenessView,
    facts: TaskFacts,
    settings: Settings,
    rule: OwnerlessRule | None = None,
) -> Decision:
    """Decide one candidate."""
    if settings.policy_for(c.kind) == "ignore":
        return Decision(c, "leave", policy_ignored(c.kind))
    if c.task_id is not None and (c.task_id in facts.held_here or c.task_id in facts.held_by_peers):
        return Decision(c, "leave", TASK_HELD)
    if c.task_id is not None and c.task_id in facts.queued:
        return Decision(c, "leave", TASK_QUEUED)
    if c.max_age_only:
        old = _older_than_max_age(c, view.now, settings)
        if old:
            return _fail(c, view, old, cause=MAX_AGE)
        return Decision(c, "leave", RETRY_PENDING)
    if c.owner is not None and c.owner in view.refused_nodes:
        return Decision(c, "leave", f"refused: {view.refused_nodes[c.owner]}")
    if c.incarnation_id is not None:
        dead = view.dead_incarnations.get(c.incarnation_id)
        if dead is not None and c.incarnation_id not in view.live_incarnations:
            return _fail(c, view, f"on {dead}", cause=OWNER_DEAD)
        return Decision(c, "leave", "owner worker is alive")
    if c.owner is not None:
        if view.node_is_me(c.owner):
            return _own_node(c, view, facts, settings)
        if c.owner in view.dead_nodes:
            last = view.node_heartbeats.get(c.owner)
            if _may_have_woken(c, last, view.now, settings, facts.first_seen.get(c.job_id)):
                return Decision(c, "leave", OWNER_MAY_HAVE_WOKEN)
            return _fail(c, view, f"on {view.dead_nodes[c.owner]}", cause=OWNER_DEAD)
        if c.owner in view.live_nodes:
            return Decision(c, "leave", "owner worker is alive")
        if c.owner in view.unregistered_silent:
            age = _age(c, view.now)
            seen = facts.first_seen.get(c.job_id)
            if age is None and seen is not None:  # start unknown: aged by the first sighting
                age = view.now - seen
            if age is not None and age > timedelta(seconds=settings.heartbeat_timeout):
                return _fail(
                    c, view, f"on {c.owner}; {NEVER_REGISTERED}", cause=OWNER_NEVER_REGISTERED
                )
        old = _older_than_max_age(c, view.now, settings)
        if old:
            return _fail(c, view, f"on {c.owner}; {old}", cause=MAX_AGE)
        return Decision(
            c, "leave", "owner unknown to jobreaper and not provably dead (set jobreaper_max_age)"
        )
    rule = rule or facts.ownerless_rule(view, settings)
    if c.task_id is not None:  # not held here (checked above): this worker is not running it
        rule = rule.for_task_not_held_here()
    first = facts.first_seen.get(c.job_id) if c.started_at is None else None
    verdict, why = rule.judge(_age(c, view.now), None if first is None else view.now - first)
    if verdict == "fail":
        return _fail(
            c,
            view,
            why,
            while_idle=c.task_id is None and why == NO_LIVE_WORKER_LEFT,
            unqueued=c.task_id is not None,
            cause=NO_LIVE_WORKER if why == NO_LIVE_WORKER_LEFT else MAX_AGE,
        )
    return Decision(c, "leave", why)


def _own_node(c: Candidate, view: LivenessView, facts: TaskFacts, settings: Settings) -> Decision:
    """A row whose owner column names this worker's node.

    Whether a task of this worker runs it is known exactly, in process, not from clocks: by
    its task id (checked above: not held here), or, without a task id, when this worker holds
    no task at all (at its startup reap, before it consumes, or idle). ``started_at`` is
    stamped by the writer's clock, which may have stepped since this worker started: it only
    tells an earlier start's row (settled at once) from one of this start, which is given a
    heartbeat interval (its task may be taking its message, or writing its end, right now).
    """
    assert view.me is not None
    if c.task_id is None and facts.held_here:
        old = _older_than_max_age(c, view.now, settings)
        if old:
            return _fail(c, view, f"on {c.owner}; {old}", cause=MAX_AGE)
        return Decision(c, "leave", MAYBE_MINE)
    undecided = view.undecided_nodes.get(view.me.node)
    if undecided is not None:  # an earlier start of this name may still be running it
        return Decision(c, "leave", undecided)
    if c.started_at is None:
        # No task of this worker runs it (known as above); its age is how long this reaper
        # has seen it, given a heartbeat interval as a row of this start is.
        seen = facts.first_seen.get(c.job_id)
        if seen is None or view.now - seen <= timedelta(seconds=settings.heartbeat_interval):
            return Decision(c, "leave", "owned by this node name, start time unknown")
        return _not_run_here(c, view)
    if as_naive_utc(c.started_at) < view.me.started_at:
        return _fail(
            c,
            view,
            f"on {c.owner} (an earlier start of this worker)",
            while_idle=not c.task_id,
            cause=EARLIER_START,
        )
    age = _age(c, view.now)
    if age is not None and age > timedelta(seconds=settings.heartbeat_interval):
        return _not_run_here(c, view)
    return Decision(c, "leave", "owned by this worker's current start")


def _not_run_here(c: Candidate, view: LivenessView) -> Decision:
    """Fail a row of this node name that no task of this worker runs (its pool process died)."""
    why = POOL_PROCESS_LOST if c.task_id else HOLDS_NO_TASK
    return _fail(
        c,
        view,
        f"on {c.owner}; {why}",
        while_idle=not c.task_id,
        unqueued=bool(c.task_id),
        cause=POOL_PROCESS_LOST_CAUSE if c.task_id else OWN_JOB_NOT_RUNNING,
    )


def _may_have_woken(
    c: Candidate,
    last_heartbeat: datetime | None,
    now: datetime,
    settings: Settings,
    first_seen: datetime | None = None,
) -> bool:
    """Whether a job of an owner found dead appeared after the owner's last heartbeat, less
    than the heartbeat timeout ago.

    The verdict rests on a heartbeat older than the timeout and no reply to a ping, both
    measured before such a job existed: its owner, marked dead during a pause, may have woken
    and written it before its next heartbeat (a busy ``-P solo`` worker answers no ping). A
    live owner heartbeats within its interval, so once the job is older than the timeout with
    the owner still silent, the silence was measured after the job appeared. (Tracked jobs
    need no such wait: the tracker vouches for a running job in the transaction that writes
    it.) The job appeared at its ``started_at`` (the writer's clock: a writer clock behind the
    database's by more than the timeout makes a new job look old, see README), or — when that
    is unknown, or later than *now* by more than a heartbeat interval (a writer clock ahead, a
    naive local time) — when this reaper first saw it (*first_seen*, the database's clock;
    ``None``: never seen, so it appears now).
    """
    if last_heartbeat is None:
        return False
    appeared = None if c.started_at is None else as_naive_utc(c.started_at)
    if appeared is None or appeared > now + timedelta(seconds=settings.heartbeat_interval):
        appeared = now if first_seen is None else first_seen
    return appeared > last_heartbeat and now - appeared < timedelta(
        seconds=settings.heartbeat_timeout
    )


def _age(c: Candidate, now: datetime) -> timedelta | None:
    return None if c.started_at is None else now - as_naive_utc(c.started_at)


def _older_than_max_age(c: Candidate, now: datetime, settings: Settings) -> str | None:
    age = _age(c, now)
    if settings.max_age is None or age is None or age <= timedelta(seconds=settings.max_age):
        return None
    return older_than_max_age(settings.max_age)


def _fail(
    c: Candidate,
    view: LivenessView,
    where: str,
    *,
    cause: str,
    while_idle: bool = False,
    unqueued: bool = False,
) -> Decision:
    age = _age(c, view.now)
    error = failure_error(c.status, None if age is None else format_age(age), where)
    return Decision(c, "fail", where, error, while_idle, unqueued, cause)
