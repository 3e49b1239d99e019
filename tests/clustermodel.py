"""A simulated Celery cluster driving the real reaper, for the model test (``test_model.py``).

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
import itertools
import os
import threading
import uuid
from collections import Counter
from collections.abc import Collection, Iterator
from datetime import datetime, timedelta, tzinfo
from typing import Any
from unittest import mock

from celery import Celery
from hypothesis import HealthCheck, Phase, Verbosity
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)

from celery_jobreaper import clock
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation, Liveness
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.settings import Settings

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
KINDS = (TRACKED, *USER_TABLES)
#: The Reaper accepts ``held=`` (the task ids this worker holds), once issue 6 item 1 is fixed.
HAS_HELD = "held" in inspect.signature(Reaper.__init__).parameters

# Deferred, so that a run can narrow them (e.g. ``clustermodel.SKEWS = (0.0,)``) to look past
# one known bug for the next.
_skews = st.deferred(lambda: st.sampled_from(SKEWS))
_kinds = st.deferred(lambda: st.sampled_from(KINDS))
_local = threading.local()


class _HostClock(datetime):
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


@dataclasses.dataclass
class Env:
    """What every example of one test run shares: the database, the app, the settings."""

    db: Database
    app: Celery
    settings: Settings
    user: dict[str, Table]


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


class ClusterModel(RuleBasedStateMachine):
    """The cluster, its rules, and the invariants checked after every step."""

    env: Env

    def __init__(self) -> None:
        super().__init__()
        self._reset_database()
        self.now = 0.0
        self.workers: list[Worker] = []  # every incarnation ever started
        self.jobs: list[Job] = []
        self.lost: Counter[str] = Counter()  # node -> ping replies still to be lost
        self.outside_skew = 0.0  # clock of the host of a reaper that is not a worker
        self.pids = itertools.count(1000)
        self.seq = itertools.count(1)
        self.lock = threading.Lock()
        self.liveness = Liveness(tables, heartbeat_timeout=HEARTBEAT_TIMEOUT)

    # --- the model's view ---------------------------------------------------------------

    def _reset_database(self) -> None:
        with self.env.db.engine.begin() as conn:
            for table in (
                tables.incarnations,
                tables.jobs,
                tables.runs,
                tables.events,
                tables.revoked,
                *self.env.user.values(),
            ):
                conn.execute(delete(table))

    def awake(self) -> list[Worker]:
        return [w for w in self.workers if w.alive and not w.paused]

    def paused(self) -> list[Worker]:
        return [w for w in self.workers if w.alive and w.paused]

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def current(self, node: str) -> Worker | None:
        return next((w for w in self.workers if w.node == node and w.alive), None)

    def held(self, worker: Worker) -> frozenset[str]:
        """Task ids the worker holds: those of its jobs whose task still runs."""
        return frozenset(j.task_id for j in self.jobs if j.worker is worker and j.running)

    def pending(self) -> list[Job]:
        """Jobs whose runner died, not yet settled or finished: ghosts."""
        return [
            j
            for j in self.jobs
            if not j.running and not j.settled and j.finished is None and not j.late
        ]

    def looks_dead(self, w: Worker) -> bool:
        """Both signals: no heartbeat for the timeout, and no answer (dead or paused)."""
        return (not w.alive or w.paused) and (
            self.now - w.last_heartbeat >= HEARTBEAT_TIMEOUT + STALE_SLACK
        )

    def fair_game(self, w: Worker) -> bool:
        """The design accepts settling the running jobs of *w*: it shows both death signals.

        Its heartbeat is about ``heartbeat_timeout`` old and it does not answer (it is paused,
        or a ping reply of its node is to be lost); a paused worker that wakes finds its jobs
        settled, and fencing keeps its late results out (DESIGN §2.1, §2.4).
        """
        stale = self.now - w.last_heartbeat >= HEARTBEAT_TIMEOUT - FRESH_MARGIN
        return stale and (w.paused or self.lost[w.node] > 0)

    def obligation(self, j: Job, r: Reap) -> str | None:
        """Why reap *r* must settle the ghost *j* (``None``: it need not).

        * tracked job of a dead incarnation (heartbeat stale, no answer), or of an earlier
          start of the reaper's own node (DESIGN §2.1, §2.2);
        * tracked job whose pool process died: its worker's failure signal settled it (§4);
        * user row with an owner column: of an earlier start of the reaper's node (started
          before this start) (§2.2); of a node all of whose incarnations are dead (§2.1);
          with a task-id column too, owned by the reaper's own worker, whose pool process died:
          its periodic reap, as the worker no longer holds the task (§4);
        * user row without owner column (task-id column or not): only when no worker could be
          running it: every other incarnation is dead, and the reaper is not a worker, or is at
          its startup, or holds no task (§4; otherwise only ``max_age``, not set here, may),
          and it is not younger than ``grace`` (0) on the reaper's clock.
        """
        owner, me = j.worker, r.worker
        if j.kind == TRACKED:
            if not j.worker_died:
                return None
            if me is not None and me.node == owner.node and me is not owner:
                return "an earlier start of the reaper's own node (§2.2)"
            if self.looks_dead(owner):
                return "its incarnation is dead: heartbeat stale and no reply (§2.1)"
            return None
        has_owner, _has_task = USER_TABLES[j.kind]
        if has_owner:
            if me is not None and me.node == owner.node:
                if me is owner:
                    if _has_task and r.trigger == "periodic":
                        return "its pool process died; its worker no longer holds its task (§4)"
                    return None
                if j.started_at < me.me.started_at:
                    return "owned by the reaper's node and started before this start (§2.2)"
                return None
            if all(self.looks_dead(w) for w in self.workers if w.node == owner.node):
                return "every incarnation of its owner node is dead (§2.1)"
            return None
        # Its age (against ``grace``) must not be negative on the reaper's clock, whichever
        # that is (its host's or the database server's): a row stamped by a host whose clock
        # runs ahead is young for as long as that.
        young = self.now - j.taken_at - j.skew + min(r.skew, 0.0) < 0
        if (
            not young
            and all(self.looks_dead(w) for w in self.workers if w is not me)
            and (me is None or r.trigger == "startup" or not r.held)
        ):
            return "no owner column and no worker could be running it (§4)"
        return None

    def deadline(self, j: Job) -> float | None:
        """Model time by which the ghost *j* must be settled (the bound), if one applies.

        A dead worker's job becomes provable ``heartbeat_timeout`` after its last heartbeat; a
        pool process's user row (owner and task-id columns) at once. From then on, a worker
        that stays awake reaps within ``interval`` (plus one tick of the model's clock), so the
        job is settled within ``heartbeat_timeout + interval`` of its worker's last sign of life.
        Ownerless rows have no bound while other workers live (DESIGN §4).
        """
        has_owner, has_task = USER_TABLES.get(j.kind, (True, True))
        if not has_owner:
            return None
        owner = j.worker
        if j.worker_died:
            node = [w for w in self.workers if w.node == owner.node]
            if any(not self.looks_dead(w) for w in node if w is not owner):
                return None  # restarted: its own startup reap settles it (checked per reap)
            provable = max(w.last_heartbeat for w in node) + HEARTBEAT_TIMEOUT + STALE_SLACK
            reapers = [w for w in self.awake() if w.node != owner.node]
        elif j.kind != TRACKED and has_task and owner.alive:
            assert j.died_at is not None
            provable = j.died_at
            reapers = [owner] if not owner.paused else []
        else:
            return None
        if any(w.awake_since <= provable for w in reapers):
            return provable + INTERVAL + TICK
        return None

    # --- simulated collaborators of the Reaper ---------------------------------------------

    def ping(self, nodes: Collection[str], timeout: float) -> set[str]:
        """Nodes whose awake worker's control consumer replies (lost replies are dropped)."""
        replied = set()
        with self.lock:
            for node in nodes:
                if any(w.node == node and w.answering for w in self.awake()):
                    if self.lost[node] > 0:
                        self.lost[node] -= 1
                    else:
                        replied.add(node)
        return replied

    def ask(self, nodes: Collection[str], task_ids: Collection[str], timeout: float) -> set[str]:
        """Task ids held by the awake workers of *nodes* (``query_task``)."""
        held: set[str] = set()
        with self.lock:
            for w in self.awake():
                if w.node in nodes and w.answering:
                    held |= self.held(w)
        return held & set(task_ids)

    # --- rules ---------------------------------------------------------------------------

    @initialize(
        nodes=st.lists(st.sampled_from(NODES), min_size=1, max_size=len(NODES), unique=True),
        skew=_skews,
        jobs=st.lists(
            st.tuples(st.integers(0, 7), _kinds, st.integers(0, POOL - 1)),
            max_size=5,
        ),
    )
    def a_cluster(self, nodes: list[str], skew: float, jobs: list[tuple[int, str, int]]) -> None:
        """Start with some workers (the first with a skewed clock) running some jobs."""
        for i, node in enumerate(nodes):
            self.start_worker(node, skew if i == 0 else 0.0)
        for pick, kind, slot in jobs:
            self.take_job(pick, kind, slot)

    @rule(node=st.sampled_from(NODES), skew=_skews)
    def start_worker(self, node: str, skew: float) -> None:
        """Start *node* (a restart kills its running incarnation first) and run its startup reap."""
        old = self.current(node)
        if old is not None:
            self._kill(old)
        with host_clock(skew):
            started = clock.utcnow()
        me = Incarnation(
            id=uuid.uuid4().hex,
            node=node,
            host=f"host-{node}",
            pid=next(self.pids),
            started_at=started,
        )
        w = Worker(me, skew, self.now, self.now, self.now + INTERVAL)
        with self.env.db.engine.begin() as conn, host_clock(skew):
            self.liveness.register(conn, me)
        self.workers.append(w)
        self._reap([Reap(w, "startup", skew, frozenset())])
        w.answering = True

    @precondition(lambda self: self.awake())
    @rule(pick=st.integers(0, 7), kind=_kinds, slot=st.integers(0, POOL - 1))
    def take_job(self, pick: int, kind: str, slot: int) -> None:
        """An awake worker's pool process starts a task, which writes its job row."""
        w = self.awake()[pick % len(self.awake())]
        task_id = uuid.uuid4().hex
        with host_clock(w.skew):
            started = clock.utcnow()
        if kind == TRACKED:
            job_id, fence = task_id, uuid.uuid4().hex
            row: dict[str, Any] = {
                "task_id": task_id,
                "task_name": "model.task",
                "status": RUNNING,
                "incarnation_id": w.me.id,
                "node": w.node,
                "started_at": started,
                "fence": fence,
                "times_reaped": 0,
            }
            table = tables.jobs
        else:
            job_id, fence = f"{kind}-{next(self.seq)}", None
            has_owner, has_task = USER_TABLES[kind]
            row = {"job_id": job_id, "job_type": "model_job", "status": RUNNING}
            row["started_at"] = started
            if has_owner:
                row["owner"] = w.node
            if has_task:
                row["task_id"] = task_id
            table = self.env.user[kind]
        with self.env.db.engine.begin() as conn:
            conn.execute(insert(table).values(**row))
        self.jobs.append(Job(kind, job_id, task_id, w, slot, started, fence, self.now, w.skew))

    @precondition(lambda self: any(j.running and not j.worker.paused for j in self.jobs))
    @rule(pick=st.integers(0, 15))
    def finish_job(self, pick: int) -> None:
        """A task ends and writes its own row (fenced for tracked jobs, as tracking does)."""
        jobs = [j for j in self.jobs if j.running and not j.worker.paused]
        j = jobs[pick % len(jobs)]
        self._end(j, "succeeded" if j.kind == TRACKED else "done", None)

    def _end(self, j: Job, status: str, error: str | None) -> None:
        j.running = False
        with host_clock(j.worker.skew):
            values = {"status": status, "completed_at": clock.utcnow(), "error": error}
        if j.kind == TRACKED:
            t = tables.jobs
            where = [t.c.task_id == j.job_id, t.c.status == RUNNING]
            if status == FAILED:  # the main process's failure signal (Tracker.lost)
                where.append(t.c.incarnation_id == j.worker.me.id)
            else:
                where.append(t.c.fence == j.fence)
            stmt = update(t).where(*where).values(**values, fence=None)
        else:
            t = self.env.user[j.kind]
            stmt = update(t).where(t.c.job_id == j.job_id, t.c.status == RUNNING).values(**values)
        with self.env.db.engine.begin() as conn:
            changed = conn.execute(stmt).rowcount
        if changed:
            j.finished = status
        else:
            j.late = True  # a reaper settled it while it ran (allowed only if fair game)

    @precondition(lambda self: self.awake())
    @rule(pick=st.integers(0, 7), slot=st.integers(0, POOL - 1))
    def kill_pool_process(self, pick: int, slot: int) -> None:
        """A pool process dies (OOM killer, hard time limit); its worker lives and replaces it."""
        w = self.awake()[pick % len(self.awake())]
        w.pools[slot] += 1
        for j in [j for j in self.jobs if j.worker is w and j.slot == slot and j.running]:
            j.died_at = self.now
            if j.kind == TRACKED:  # the main process sees it and fails the tracked job
                self._end(j, FAILED, "WorkerLostError('Worker exited prematurely: signal 9')")
            else:
                j.running = False

    @precondition(lambda self: self.alive())
    @rule(pick=st.integers(0, 7))
    def kill_worker(self, pick: int) -> None:
        """A worker dies hard (SIGKILL of its process group, node loss)."""
        self._kill(self.alive()[pick % len(self.alive())])

    def _kill(self, w: Worker) -> None:
        w.alive = False
        w.paused = False
        for j in self.jobs:
            if j.worker is w:
                if j.running:
                    j.running = False
                    j.died_at = self.now
                j.worker_died = True

    @precondition(lambda self: self.awake())
    @rule(pick=st.integers(0, 7))
    def pause_worker(self, pick: int) -> None:
        """A worker stops (SIGSTOP, partition): no heartbeats, no replies; its tasks go on."""
        self.awake()[pick % len(self.awake())].paused = True

    @precondition(lambda self: self.paused())
    @rule(pick=st.integers(0, 7))
    def resume_worker(self, pick: int) -> None:
        """A paused worker wakes up; it heartbeats at its next tick."""
        w = self.paused()[pick % len(self.paused())]
        w.paused = False
        w.awake_since = self.now

    @rule(which=st.integers(0, len(NODES)), skew=_skews)
    def skew_clock(self, which: int, skew: float) -> None:
        """A host's clock steps (a node's, or, for ``which == len(NODES)``, the outside one's)."""
        if which == len(NODES):
            self.outside_skew = skew
        else:
            w = self.current(NODES[which])
            if w is not None:
                w.skew = skew

    @rule(node=st.sampled_from(NODES))
    def lose_ping_reply(self, node: str) -> None:
        """The next ping reply of *node* is lost."""
        self.lost[node] += 1

    @rule(ticks=st.integers(1, 7))
    def advance(self, ticks: int) -> None:
        """Time passes: awake workers heartbeat every tick and reap every ``interval``."""
        for _ in range(ticks):
            self._shift(TICK)
            self.now += TICK
            for w in self.awake():
                with self.env.db.engine.begin() as conn, host_clock(w.skew):
                    self.liveness.heartbeat(conn, w.me)
                w.last_heartbeat = self.now
            for w in self.awake():
                if w.next_reap <= self.now:
                    w.next_reap = self.now + INTERVAL
                    self._reap([self._periodic(w)])

    @rule(pick=st.integers(0, 7))
    def reap(self, pick: int) -> None:
        """A reap runs now: a worker's timer fires, or (the last choice) a process that is not a
        worker reaps (``celery jobreaper reap``, a web app's start)."""
        choices = [self._periodic(w) for w in self.awake()] + [self._outside()]
        self._reap([choices[min(pick, len(choices) - 1)]])

    @rule(a=st.integers(0, 7), b=st.integers(0, 7))
    def two_reapers_at_once(self, a: int, b: int) -> None:
        """Two reapers run at the same moment (any two, the same kind twice included)."""
        choices = [self._periodic(w) for w in self.awake()] + [self._outside()]
        self._reap([choices[a % len(choices)], choices[b % len(choices)]])

    def _periodic(self, w: Worker) -> Reap:
        return Reap(w, "periodic", w.skew, self.held(w))

    def _outside(self) -> Reap:
        return Reap(None, "manual", self.outside_skew, frozenset())

    # --- running reapers and checking what they did ----------------------------------------

    def _reap(self, reaps: list[Reap]) -> None:
        protected = [
            j for j in self.jobs if j.running and not j.settled and not self.fair_game(j.worker)
        ]
        owed = [
            (j, r, why) for r in reaps for j in self.pending() if (why := self.obligation(j, r))
        ]
        if len(reaps) == 1:
            self._run(reaps[0])
        else:
            self._run_together(reaps)
        self._observe()
        for j in protected:
            assert not j.settled, (
                f"§2.1 violated: {j!r} was settled by {_describe(reaps)} while its task ran "
                f"(its worker: alive, paused={j.worker.paused}, last heartbeat "
                f"{self.now - j.worker.last_heartbeat:g} s ago, skew {j.worker.skew:g} s)"
            )
        for j, r, why in owed:
            assert j.settled, f"bound violated: {_describe([r])} left {j!r} running; {why}"

    def _run(self, r: Reap) -> None:
        kwargs: dict[str, Any] = {
            "me": None if r.worker is None else r.worker.me,
            "ping": self.ping,
            "ask": self.ask,
        }
        if HAS_HELD and r.worker is not None:
            held = set(r.held)
            kwargs["held"] = lambda: set(held)
        reaper = Reaper(self.env.app, self.env.settings, self.env.db, **kwargs)
        with host_clock(r.skew):
            reaper.run(r.trigger)

    def _run_together(self, reaps: list[Reap]) -> None:
        barrier = threading.Barrier(len(reaps))
        errors: list[BaseException] = []

        def run(r: Reap) -> None:
            try:
                barrier.wait(timeout=30)
                self._run(r)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=run, args=(r,)) for r in reaps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        if errors:
            raise errors[0]

    def _observe(self) -> None:
        """Read every job's status and ledger events; check exactly-once (§2.3)."""
        ev = tables.events
        with self.env.db.engine.connect() as conn:
            events = Counter(
                {
                    (source, job_id): n
                    for source, job_id, n in conn.execute(
                        select(ev.c.source, ev.c.job_id, func.count())
                        .where(ev.c.action == "settled")
                        .group_by(ev.c.source, ev.c.job_id)
                    )
                }
            )
            status = {
                (tables.jobs.name, r[0]): r[1]
                for r in conn.execute(select(tables.jobs.c.task_id, tables.jobs.c.status))
            }
            for name, t in self.env.user.items():
                status.update(
                    {(name, r[0]): r[1] for r in conn.execute(select(t.c.job_id, t.c.status))}
                )
        known = set()
        for j in self.jobs:
            key = (tables.jobs.name if j.kind == TRACKED else j.kind, j.job_id)
            known.add(key)
            now, n = status[key], events[key]
            if j.finished is not None:
                assert (now, n) == (j.finished, 0), (
                    f"a reaper changed {j!r}, which its own worker had ended as {j.finished}: "
                    f"now {now!r} with {n} ledger event(s)"
                )
                continue
            reaped = now == FAILED
            assert reaped or now == RUNNING, f"{j!r} has status {now!r}"
            assert n == (1 if reaped else 0), (
                f"§2.3 violated: {j!r} ({now}) has {n} 'settled' ledger events"
            )
            j.settled = reaped
        stray = set(events) - known
        assert not stray, f"§2.3 violated: ledger events for jobs never settled: {sorted(stray)}"

    def _shift(self, seconds: float) -> None:
        """Move every stored moment (and the model's copies) *seconds* into the past."""
        delta = timedelta(seconds=seconds)
        with self.env.db.engine.begin() as conn:
            for table in (tables.incarnations, tables.jobs, *self.env.user.values()):
                key = next(iter(table.primary_key.columns))
                cols = [c for c in table.c if isinstance(c.type, DateTime)]
                rows = conn.execute(select(key, *cols)).all()
                if not rows:
                    continue
                stmt = (
                    update(table)
                    .where(key == bindparam("m_key"))
                    .values({c.name: bindparam(f"m_{c.name}") for c in cols})
                )
                conn.execute(
                    stmt,
                    [
                        {
                            "m_key": row[0],
                            **{
                                f"m_{c.name}": None if row[i] is None else row[i] - delta
                                for i, c in enumerate(cols, 1)
                            },
                        }
                        for row in rows
                    ],
                )
        for w in self.workers:
            w.me = dataclasses.replace(w.me, started_at=w.me.started_at - delta)
        for j in self.jobs:
            j.started_at -= delta

    @invariant()
    def settled_exactly_once_and_within_the_bound(self) -> None:
        self._observe()
        for j in self.pending():
            due = self.deadline(j)
            assert due is None or self.now < due, (
                f"bound violated: {j!r}, whose runner died at {j.died_at:g} s, is still "
                f"running at {self.now:g} s (due by {due:g} s: heartbeat_timeout + interval)"
            )


def _describe(reaps: list[Reap]) -> str:
    return " and ".join(
        f"the {r.trigger} reap of {r.worker!r}" if r.worker else "a reap from outside"
        for r in reaps
    )


@contextlib.contextmanager
def model_for(url: str, machine: type[ClusterModel] = ClusterModel) -> Iterator[type[ClusterModel]]:
    """*machine* bound to the database at *url* (tables made once, emptied per example), with the
    simulated host clocks installed."""
    app = Celery("jobreaper_model", set_as_current=False)
    metadata = MetaData()
    user = {
        name: user_table(metadata, name, owner=owner, task_id=task)
        for name, (owner, task) in USER_TABLES.items()
    }
    sources = [
        {
            "table": table,
            "name": name,
            "id": "job_id",
            "status": "status",
            "kind": "job_type",
            "started_at": "started_at",
            "completed_at": "completed_at",
            "error": "error",
            "owner": "owner" if "owner" in table.c else None,
            "task_id": "task_id" if "task_id" in table.c else None,
        }
        for name, table in user.items()
    ]
    settings = Settings.from_app(
        app,
        database_url=url,
        sources=sources,
        track_tasks=True,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        interval=INTERVAL,
        ping_timeout=0.1,
        queue_cleanup="off",
        create_tables=False,
    )
    db = Database.from_settings(settings)
    try:
        create_all(db.engine)
        metadata.create_all(db.engine)
        env = Env(db=db, app=app, settings=settings, user=user)
        with mock.patch.object(clock, "datetime", _HostClock):
            yield type(machine.__name__, (machine,), {"env": env})
    finally:
        db.dispose()
        app.close()


def run_model(machine: type[ClusterModel], url: str, *, examples: int, steps: int) -> None:
    """Let Hypothesis run *machine* against the database at *url*."""
    config = hypothesis_settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=not os.environ.get("JR_MODEL_RANDOM"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        print_blob=False,
        # Shrinking a failure takes minutes (Hypothesis's limit is 5): on demand only.
        phases=[Phase.explicit, Phase.generate]
        + ([Phase.shrink] if os.environ.get("JR_MODEL_SHRINK") else []),
        report_multiple_bugs=False,
        verbosity=Verbosity.verbose if os.environ.get("JR_MODEL_VERBOSE") else Verbosity.normal,
    )
    with model_for(url, machine) as bound:
        run_state_machine_as_test(bound, settings=config)


def replay(url: str, steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Run *steps* (rule name, arguments), as Hypothesis prints a failing case, checking the
    invariants after each."""
    with model_for(url) as model:
        state = model()
        state.settled_exactly_once_and_within_the_bound()
        for name, arguments in steps:
            getattr(state, name)(**arguments)
            state.settled_exactly_once_and_within_the_bound()
