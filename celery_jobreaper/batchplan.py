"""A batch's decisions with its task facts: the tasks this worker holds, those live peers hold
(asked once per batch, exactly them), and those waiting in the queues (read once per run)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from .livenessview import LivenessView
from .peers import TaskAsker
from .planner import Decision, TaskFacts, plan
from .settings import Settings
from .textsafe import safe

logger = logging.getLogger(__name__)

#: Left alone: a job with a task id while the queues could not be read (its message, e.g. a
#: retry, may be waiting there).
QUEUES_UNREAD = "could not read the queues; its message may still be waiting"


def leave_task_jobs(
    decisions: list[Decision], reason: str, *, only_unqueued: bool = False
) -> list[Decision]:
    """Turn every would-fail decision about a job with a task id into "leave" (*reason*);
    with *only_unqueued*, only those that rest on its message not waiting in a queue."""
    return [
        Decision(d.candidate, "leave", reason)
        if d.verdict == "fail" and d.candidate.task_id and (d.unqueued or not only_unqueued)
        else d
        for d in decisions
    ]


class Once:
    """A value read at most once per run, on first use (``None``: it could not be read)."""

    def __init__(self, read: Callable[[], frozenset[str] | None]) -> None:
        self._read = read
        self._done = False
        self._value: frozenset[str] | None = None

    def __call__(self) -> frozenset[str] | None:
        """The value, read now if it was not yet."""
        if not self._done:
            self._value = self._read()
            self._done = True
        return self._value


def read_queues(
    queued_task_ids: Callable[[], set[str] | None] | None,
) -> frozenset[str] | None:
    """Task ids waiting in the queues; ``None`` when they could not be read (unknown)."""
    if queued_task_ids is None:
        return frozenset()
    try:
        found = queued_task_ids()
        return None if found is None else frozenset(found)
    except Exception as error:
        logger.warning(
            "jobreaper: could not read the queues (%s); jobs with a task id are left alone "
            "this time",
            safe(error),
        )
        return None


def decide(
    batch: list[Any],
    view: LivenessView,
    settings: Settings,
    *,
    held_here: frozenset[str],
    queued: Once,
    ask: TaskAsker,
    first_seen: Mapping[Any, datetime] | None = None,
) -> list[Decision]:
    """Plan a batch with its task facts: queued (read once per run), held here, held by
    live peers (asked once per batch, exactly them: :func:`~.peers.ask_with`), and when this
    reaper first saw its jobs whose start is unknown (*first_seen*)."""
    with_task = any(c.task_id for c in batch)
    waiting = queued() if with_task else frozenset()
    facts = TaskFacts(queued=waiting or frozenset(), held_here=held_here)
    if first_seen:
        facts = dataclasses.replace(facts, first_seen=first_seen)
    decisions = plan(batch, view, facts, settings)
    if waiting is None:
        # Unknown is not "nothing queued": a job whose failure rests on its message not
        # waiting anywhere (no owner known, or this worker's own job it no longer holds) is
        # left alone; a dead owner's job is still settled (its message is its dead run's).
        decisions = leave_task_jobs(decisions, QUEUES_UNREAD, only_unqueued=True)
    task_ids = [
        d.candidate.task_id for d in decisions if d.verdict == "fail" and d.candidate.task_id
    ]
    if not task_ids:
        return decisions
    nodes = {
        view.incarnation_nodes[i] for i in view.live_incarnations if i in view.incarnation_nodes
    } | view.live_nodes
    if view.me is not None:
        nodes.discard(view.me.node)
    if not nodes:
        return decisions
    try:
        peers = ask(sorted(nodes), task_ids, settings.ping_timeout)
    except Exception as error:
        logger.warning(
            "jobreaper: could not ask live workers %s about %d tasks (%s); "
            "leaving those jobs alone this time",
            sorted(nodes),
            len(task_ids),
            safe(error),
        )
        return leave_task_jobs(decisions, "could not ask live workers about its task")
    if not peers:
        return decisions
    facts = dataclasses.replace(facts, held_by_peers=frozenset(peers))
    decisions = plan(batch, view, facts, settings)
    if waiting is None:
        return leave_task_jobs(decisions, QUEUES_UNREAD, only_unqueued=True)
    return decisions
