"""The rule for jobs without owner, defined once: the planner applies it in Python and
:mod:`celery_jobreaper.bulk_rule` builds the same verdicts in SQL from the same object."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

#: Left alone: a job without owner that started less than ``jobreaper_grace`` ago.
YOUNGER_THAN_GRACE = "younger than jobreaper_grace"
#: Failed: a job without owner while no worker at all could be running it.
NO_LIVE_WORKER_LEFT = "with no live worker left that could be running it"
#: Left alone: a job without owner, no worker live now, but the job is not older than the
#: heartbeat timeout: a worker marked dead during a pause may have woken up and started it
#: before its first heartbeat (a busy ``-P solo`` worker does not answer pings either).
YOUNGER_THAN_HEARTBEAT_TIMEOUT = (
    "no live worker seen, but younger than jobreaper_heartbeat_timeout: a worker woken from "
    "a pause may be running it before its next heartbeat (judged again later)"
)
#: Left alone: a job without owner whose start is unknown (``NULL``, or no ``started_at``
#: column), no worker live now, but this reaper has not yet seen it for the heartbeat timeout:
#: a worker woken from a pause may have written it just before its first heartbeat.
START_UNKNOWN_SEEN_BRIEFLY = (
    "no live worker seen, but its start is unknown and this reaper first saw it less than "
    "jobreaper_heartbeat_timeout ago: a worker woken from a pause may be running it (judged "
    "again later)"
)
#: Left alone: a job without owner that a live worker (this one or another) may be running.
UNOWNED_WHILE_WORKERS_LIVE = (
    "no owner recorded and a live worker (this one or another) may be running it "
    "(set jobreaper_max_age)"
)


def older_than_max_age(max_age: float) -> str:
    """Reason (the *where* part) for failing a job older than ``jobreaper_max_age``."""
    return f"older than jobreaper_max_age ({max_age:g} s)"


@dataclasses.dataclass(frozen=True, slots=True)
class OwnerlessRule:
    """When a job with neither owner nor task id may be failed (DESIGN §4).

    Such a job is stale when no worker at all could be running it — this worker holds no
    task (at startup, before the consumer runs, it holds none; a process that is not a
    worker holds none) **and** no other worker is live — or when it is older than
    ``max_age``. Jobs younger than ``grace`` are always left alone.

    "No other worker is live" is known only from heartbeats and pings. A worker marked dead
    during a pause (SIGSTOP, VM freeze, partition) that wakes up runs its tasks at once, and
    one may write a new job row before the worker's first heartbeat lands; busy in that task
    (``-P solo``), it does not answer a ping either. Both signals were then measured before
    the job existed. So "no live worker" fails a job only once it is older than
    ``heartbeat_timeout`` (or ``max_age``, if shorter): a live worker heartbeats within its
    interval, so a stale heartbeat at that age was measured after the job appeared. A job
    whose start is unknown (``NULL``, or no ``started_at`` column) is aged for this verdict
    by how long this reaper has seen it (:mod:`~celery_jobreaper.sightings`, the database's
    clock): it is failed on "no live worker" only once first seen longer ago than that, so a
    reaper that never saw it before (a new process) leaves it alone. Grace and ``max_age``
    speak of the job's real age: such a job is never younger than grace, never older than
    ``max_age``.
    """

    #: no other live worker and this process holds no task
    nobody_could_run: bool
    grace: float  #: seconds
    max_age: float | None  #: seconds
    #: no other live worker (this process may hold tasks)
    no_other_live_worker: bool = False
    #: seconds: "no live worker" fails only jobs older than this (``jobreaper_heartbeat_timeout``)
    heartbeat_timeout: float = 0.0

    @classmethod
    def of(
        cls,
        *,
        other_live_workers: int,
        held_here: bool,
        grace: float,
        max_age: float | None,
        heartbeat_timeout: float,
    ) -> OwnerlessRule:
        """The rule for one batch: *held_here* says whether this process holds any task."""
        alone = other_live_workers == 0
        return cls(alone and not held_here, grace, max_age, alone, heartbeat_timeout)

    @property
    def alone_after(self) -> float:
        """Seconds of age from which "no live worker" fails a job: the heartbeat timeout, or
        ``max_age`` if that is shorter (which fails such a job whoever is live)."""
        if self.max_age is None:
            return self.heartbeat_timeout
        return min(self.heartbeat_timeout, self.max_age)

    def for_task_not_held_here(self) -> OwnerlessRule:
        """The rule for a job whose task id this process does not hold (known exactly, in
        process): only other workers could be running it."""
        return dataclasses.replace(self, nobody_could_run=self.no_other_live_worker)

    @property
    def where(self) -> str | None:
        """The *where* of every failure this rule makes (``None``: it fails no row)."""
        if self.nobody_could_run:
            return NO_LIVE_WORKER_LEFT
        if self.max_age is not None:
            return older_than_max_age(self.max_age)
        return None

    def seen_long_enough(self, seen_for: timedelta | None) -> bool:
        """Whether a job whose start is unknown, seen by this reaper for *seen_for* (``None``:
        never seen), may be failed on "no live worker" (the heartbeat timeout, as for ages)."""
        return seen_for is not None and seen_for > timedelta(seconds=self.alone_after)

    def seen_before(self, first_seen: Mapping[Any, datetime], now: datetime) -> list[Any]:
        """Of *first_seen* (job id -> first seen), the jobs seen long enough by *now*."""
        return [k for k, t in first_seen.items() if self.seen_long_enough(now - t)]

    def judge(
        self, age: timedelta | None, seen_for: timedelta | None = None
    ) -> tuple[Literal["fail", "leave"], str]:
        """The verdict for a job of *age* (``None``: start unknown) and its reason/where.

        *seen_for*: for a job whose start is unknown, how long this reaper has seen it
        (``None``: not seen before); it stands in for the age in the "no live worker" verdict
        only."""
        if age is not None and age < timedelta(seconds=self.grace):
            return "leave", YOUNGER_THAN_GRACE
        if self.nobody_could_run:
            if age is None:
                if self.seen_long_enough(seen_for):
                    return "fail", NO_LIVE_WORKER_LEFT
                return "leave", START_UNKNOWN_SEEN_BRIEFLY
            if age > timedelta(seconds=self.alone_after):
                return "fail", NO_LIVE_WORKER_LEFT
            return "leave", YOUNGER_THAN_HEARTBEAT_TIMEOUT
        if self.max_age is not None and age is not None and age > timedelta(seconds=self.max_age):
            return "fail", older_than_max_age(self.max_age)
        return "leave", UNOWNED_WHILE_WORKERS_LIVE
