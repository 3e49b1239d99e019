"""The world of the model test: model time and host clocks, the job tables, what is simulated.

Time is model time, in seconds. To make it pass whatever clock the code reads (this host's,
or the database server's), advancing time moves every timestamp stored in the incarnation and
job tables back by the step (and the in-memory incarnation start times with them): to any
clock, the stored moments are then that much older. Real time passes too, but only the few
seconds an example takes; margins below absorb it. A host's clock skew is simulated by
:func:`host_clock`: inside it, ``celery_jobreaper.clock`` (the one place the code reads this
host's clock) runs ahead or behind. If heartbeats are stamped and judged with the database
server's clock, the skew reaches neither and must not matter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta, tzinfo
from typing import Any

from celery import Celery
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text

from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.settings import Settings
from celery_jobreaper.sightings import Sightings

#: Seconds between heartbeats; also the model's clock tick.
HEARTBEAT_INTERVAL = 10.0
#: Seconds without a heartbeat after which a worker is a suspect (DESIGN default).
HEARTBEAT_TIMEOUT = 60.0
#: Seconds between two periodic reaps of a worker.
INTERVAL = 30.0
TICK = HEARTBEAT_INTERVAL
#: A heartbeat younger than ``HEARTBEAT_TIMEOUT - FRESH_MARGIN`` model seconds is fresh to any
#: clock the code may use (real time passing during an example only makes it look older).
FRESH_MARGIN = 20.0
#: A heartbeat at least ``HEARTBEAT_TIMEOUT + STALE_SLACK`` model seconds old is stale.
STALE_SLACK = 1.0
NODES = ("celery@n0", "celery@n1", "celery@n2")
#: Pool processes per worker.
POOL = 2
#: Seconds a simulated host clock may be off (DESIGN §4: one clock; skew must not matter).
SKEWS = (-90.0, -45.0, 0.0, 45.0, 90.0)
FAILED = "failed"
RUNNING = "running"
TRACKED = "tracked"
#: User tables: name -> (has an owner column, has a task-id column).
USER_TABLES = {
    "jobs_owned": (True, True),
    "jobs_owner": (True, False),
    "jobs_task": (False, True),
    "jobs_seed": (False, False),  # the seed's shape
}
#: Kinds whose rows name no owner: the "no live worker" rule judges them.
OWNERLESS = frozenset(k for k, (owner, _task) in USER_TABLES.items() if not owner)
KINDS = (TRACKED, *USER_TABLES)
#: The Reaper accepts ``held=`` (the task ids this worker holds), once issue 6 item 1 is fixed.
HAS_HELD = "held" in inspect.signature(Reaper.__init__).parameters

_local = threading.local()


class HostClock(datetime):
    """``datetime`` as :mod:`celery_jobreaper.clock` sees it: this thread's simulated host."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        return datetime.now(tz) + timedelta(seconds=getattr(_local, "skew", 0.0))


@contextlib.contextmanager
def host_clock(skew: float) -> Iterator[None]:
    """Run with this thread's host clock *skew* seconds off."""
    before = getattr(_local, "skew", 0.0)
    _local.skew = skew
    try:
        yield
    finally:
        _local.skew = before


def user_table(metadata: MetaData, name: str, *, owner: bool, task_id: bool) -> Table:
    """A table in the seed's shape (``system_jobs``), optionally with owner / task-id columns."""
    cols: list[Column[Any]] = [
        Column("job_id", String(64), primary_key=True),
        Column("job_type", String(64)),
        Column("status", String(16), nullable=False),
        Column("started_at", DateTime),
        Column("completed_at", DateTime),
        Column("error", Text),
    ]
    if owner:
        cols.append(Column("owner", String(191)))
    if task_id:
        cols.append(Column("task_id", String(191)))
    return Table(name, metadata, *cols)


class ModelTime:
    """The ``time`` module as :mod:`celery_jobreaper.reaper` and :mod:`celery_jobreaper.clock`
    see it: its sleeps pass model time (the current example's :meth:`wait`), not real time;
    its monotonic clock runs with model time (``elapsed``: model seconds passed so far)."""

    perf_counter = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.wait: Callable[[float], None] = time.sleep
        self.elapsed = 0.0

    def sleep(self, seconds: float) -> None:
        self.wait(seconds)

    def monotonic(self) -> float:
        return time.monotonic() + self.elapsed


@dataclasses.dataclass
class Env:
    """What every example of one test run shares: the database, the app, the settings."""

    db: Database
    app: Celery
    settings: Settings
    user: dict[str, Table]
    waits: ModelTime


@dataclasses.dataclass(eq=False)
class Worker:
    """One incarnation of a worker (a node restarted is a new one)."""

    me: Incarnation  #: as registered; ``started_at`` moves with the stored timestamps
    skew: float  #: its host clock, seconds off
    last_heartbeat: float  #: model time of its last heartbeat
    awake_since: float  #: model time since which it is alive and not paused
    next_reap: float  #: model time of its next periodic reap
    alive: bool = True
    paused: bool = False  #: SIGSTOP, a long GC pause, a partition: alive, but silent
    answering: bool = False  #: its remote-control consumer is up (after its startup reap)
    #: busy in a task (``-P solo``, or gevent in a CPU-bound task): its consumer answers no
    #: ping until one of its tasks ends; its heartbeat thread runs
    busy: bool = False
    #: woken from a pause, its first heartbeat not yet written
    woken: bool = False
    pools: list[int] = dataclasses.field(default_factory=lambda: [0] * POOL)

    @property
    def node(self) -> str:
        return self.me.node

    def __repr__(self) -> str:
        return f"<{self.node} pid {self.me.pid}>"


@dataclasses.dataclass(eq=False)
class Job:
    """One job: a row in the tracked-jobs table or a user table, and the task running it."""

    kind: str
    job_id: str
    task_id: str  #: its Celery task id (stored only where the table has the column)
    worker: Worker
    slot: int  #: the pool process running it
    started_at: datetime  #: as its worker's host wrote it; moves with the stored timestamps
    fence: str | None
    taken_at: float  #: model time it started
    skew: float  #: the clock skew of the host that wrote ``started_at``
    #: its row's ``started_at`` is NULL (a job without owner, ``scheduled`` in the seed)
    unstarted: bool = False
    running: bool = True  #: its task still runs (worker and pool process alive, not done)
    died_at: float | None = None  #: model time its runner died
    worker_died: bool = False  #: its worker died (not only its pool process)
    finished: str | None = None  #: the status its own worker wrote (the write changed the row)
    settled: bool = False  #: a reaper settled it (seen in the database)
    late: bool = False  #: its worker's own end came after a reaper had settled it

    def __repr__(self) -> str:
        return f"<{self.kind} job {self.job_id} of {self.worker!r} slot {self.slot}>"


@dataclasses.dataclass(frozen=True)
class Reap:
    """One reap run: from a worker (``startup`` / ``periodic``) or another process."""

    worker: Worker | None
    trigger: str
    skew: float
    held: frozenset[str]


class ModelSightings(Sightings):
    """A worker's :class:`~celery_jobreaper.sightings.Sightings` in model time: the stored
    first sightings move back with the stored timestamps (:meth:`shift`), and the model time
    of each first sighting is kept beside it (:meth:`model_first`)."""

    def __init__(self, now: Callable[[], float]) -> None:
        super().__init__()
        self._now = now
        self._model: dict[tuple[str, Any], float] = {}

    def note(self, source: str, job_ids: Iterable[Any], now: datetime) -> Mapping[Any, datetime]:
        ids = list(job_ids)
        known = self.first_seen(source)
        for job_id in ids:
            if job_id not in known:
                self._model[(source, job_id)] = self._now()
        return super().note(source, ids, now)

    def model_first(self, source: str, job_id: Any) -> float | None:
        """Model time this reaper first saw the job (``None``: it does not remember it)."""
        if job_id not in self.first_seen(source):
            return None
        return self._model.get((source, job_id))

    def shift(self, delta: timedelta) -> None:
        """Move every first sighting *delta* into the past, as the stored timestamps move."""
        with self._lock:
            for first in self._first.values():
                for job_id in first:
                    first[job_id] -= delta
