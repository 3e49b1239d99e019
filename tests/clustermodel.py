"""The simulated cluster of the model test (``test_model.py``): rules and invariants.

See :mod:`modelworld` for how time and clocks are simulated, :mod:`modelstate` for what the
design demands in each state, :mod:`modelrun` for running it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import uuid
from collections import Counter
from collections.abc import Collection
from datetime import timedelta
from typing import Any

import modelworld
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from modelstate import ClusterState
from modelworld import (
    FAILED,
    HAS_HELD,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    INTERVAL,
    NODES,
    OWNERLESS,
    POOL,
    RUNNING,
    TICK,
    TRACKED,
    USER_TABLES,
    Env,
    Job,
    ModelSightings,
    Reap,
    Worker,
    host_clock,
)
from sqlalchemy import DateTime, bindparam, delete, func, insert, select, update

from celery_jobreaper import clock
from celery_jobreaper.liveness import Incarnation, Liveness
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import tables
from celery_jobreaper.tracking.statements import Statements

# Deferred, so that a run can narrow them (e.g. ``modelworld.SKEWS = (0.0,)``) to look past
# one known bug for the next.
_skews = st.deferred(lambda: st.sampled_from(modelworld.SKEWS))
_kinds = st.deferred(lambda: st.sampled_from(modelworld.KINDS))


class ClusterModel(ClusterState, RuleBasedStateMachine):
    """The cluster, its rules, and the invariants checked after every step."""

    env: Env

    def __init__(self) -> None:
        super().__init__()
        self._reset_database()
        self.outside_skew = 0.0  # clock of the host of a reaper that is not a worker
        self.pids = itertools.count(1000)
        self.seq = itertools.count(1)
        self.lock = threading.Lock()
        self.liveness = Liveness(tables, heartbeat_timeout=HEARTBEAT_TIMEOUT)
        self.fair_after_wait: set[Job] = set()
        self.env.waits.wait = self.wait

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

    # --- simulated collaborators of the Reaper ---------------------------------------------

    def ping(
        self, nodes: Collection[str] | None, timeout: float, me: Worker | None = None
    ) -> set[str]:
        """Nodes whose awake worker's control consumer replies (lost replies are dropped), as
        ``ping_with(app, me)`` gives them: never the reply of the pinging worker *me* itself.
        ``nodes=None`` pings every worker (a broadcast)."""
        replied = set()
        with self.lock:
            every = sorted({w.node for w in self.awake()}) if nodes is None else nodes
            for node in every:
                if any(
                    w.node == node and w.answering and not w.busy and w is not me
                    for w in self.awake()
                ):
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
                if w.node in nodes and w.answering and not w.busy:
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
            started_monotonic=clock.monotonic(),
        )
        w = Worker(me, skew, self.now, self.now, self.now + INTERVAL)
        with self.env.db.engine.begin() as conn, host_clock(skew):
            self.liveness.register(conn, me)
        self.workers.append(w)
        self._reap([Reap(w, "startup", skew, frozenset())])
        w.answering = True
        self._due_reaps()  # of the other workers, if the startup reap waited

    @precondition(lambda self: self.awake())
    @rule(
        pick=st.integers(0, 7),
        kind=_kinds,
        slot=st.integers(0, POOL - 1),
        unstarted=st.booleans(),
    )
    def take_job(self, pick: int, kind: str, slot: int, unstarted: bool = False) -> None:
        """An awake worker's pool process starts a task, which writes its job row (*unstarted*:
        a row without owner column writes no ``started_at``, as the seed's ``scheduled``)."""
        self._take(self.awake()[pick % len(self.awake())], kind, slot, unstarted)

    def _take(self, w: Worker, kind: str, slot: int, unstarted: bool = False) -> None:
        unstarted = unstarted and kind in OWNERLESS
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
            row["started_at"] = None if unstarted else started
            if has_owner:
                row["owner"] = w.node
            if has_task:
                row["task_id"] = task_id
            table = self.env.user[kind]
        with self.env.db.engine.begin() as conn:
            if kind == TRACKED:  # the tracker vouches for a running job it writes
                inc = tables.incarnations
                beat = select(inc.c.heartbeat_at).where(inc.c.id == w.me.id)
                before = conn.execute(beat).scalar()
                Statements(tables.jobs, tables.incarnations).vouch(
                    conn, w.me.id, older_than=min(1.5 * HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT / 2)
                )
                if conn.execute(beat).scalar() != before:
                    w.last_heartbeat = self.now
            conn.execute(insert(table).values(**row))
        self.jobs.append(
            Job(kind, job_id, task_id, w, slot, started, fence, self.now, w.skew, unstarted)
        )

    @precondition(lambda self: any(j.running and not j.worker.paused for j in self.jobs))
    @rule(pick=st.integers(0, 15))
    def finish_job(self, pick: int) -> None:
        """A task ends and writes its own row (fenced for tracked jobs, as tracking does)."""
        jobs = [j for j in self.jobs if j.running and not j.worker.paused]
        j = jobs[pick % len(jobs)]
        j.worker.busy = False  # its task ended: its consumer answers again
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
    @rule(pick=st.integers(0, 7), writes=st.none() | _kinds, unstarted=st.booleans())
    def resume_worker(
        self, pick: int, writes: str | None = None, busy: bool = False, unstarted: bool = False
    ) -> None:
        """A paused worker wakes up; it heartbeats at its next tick (after the reaps due then:
        its heartbeat thread resumes mid-interval, see :meth:`_tick`). *busy*: a ``-P solo``
        worker woken inside a task (or gevent in a CPU-bound one): its tasks run on at once,
        but it answers no ping until one of them ends. *writes*: it wakes inside a task (so it is
        busy) that writes a new job row of that kind at once, before the worker's first
        heartbeat (*unstarted*: a row without ``started_at``, if it has no owner column)."""
        w = self.paused()[pick % len(self.paused())]
        w.paused = False
        w.busy = busy or writes is not None
        w.woken = True
        w.awake_since = self.now
        if writes is not None:
            self._take(w, writes, 0, unstarted)

    @precondition(lambda self: self.awake())
    @rule(
        pick=st.integers(0, 7),
        ticks=st.integers(1, 10),
        writes=st.none() | st.sampled_from(sorted(OWNERLESS)) | _kinds,
        unstarted=st.booleans(),
    )
    def pause_and_wake(
        self, pick: int, ticks: int, writes: str | None, unstarted: bool = False
    ) -> None:
        """One pause episode in a step: a worker stops (SIGSTOP, VM freeze, partition), time
        passes (the others heartbeat and reap, and may mark it dead), and it wakes, maybe
        inside a task that writes a new job row at once (:meth:`resume_worker`)."""
        w = self.awake()[pick % len(self.awake())]
        w.paused = True
        self.advance(ticks)
        if w.alive and w.paused:
            self.resume_worker(self.paused().index(w), writes, unstarted=unstarted)

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
            self._tick()
            self._due_reaps()
            self._first_beats()

    def _tick(self) -> None:
        """Model time passes one tick; awake workers heartbeat, except one just woken from a
        pause: its heartbeat thread resumed mid-interval, its first heartbeat lands after the
        reaps due at this moment (:meth:`_first_beats`)."""
        self._shift(TICK)
        self.now += TICK
        self.env.waits.elapsed += TICK
        for w in self.awake():
            if not w.woken:
                self._beat(w)

    def _first_beats(self) -> None:
        for w in self.awake():
            if w.woken:
                self._beat(w)
                w.woken = False

    def _beat(self, w: Worker) -> None:
        with self.env.db.engine.begin() as conn, host_clock(w.skew):
            self.liveness.heartbeat(conn, w.me)
        w.last_heartbeat = self.now

    def _due_reaps(self) -> None:
        for w in self.awake():
            if w.next_reap <= self.now:
                w.next_reap = self.now + INTERVAL
                self._reap([self._periodic(w)])

    def wait(self, seconds: float) -> None:
        """The reaper sleeps *seconds* (a startup reap waits, before its worker consumes, for
        an earlier start of its node name to be quiet): model time passes meanwhile, awake
        workers heartbeat (the starting one too). Whose jobs became fair game by the end of the
        wait is noted: the reaper's second look may settle them."""
        for _ in range(math.ceil(seconds / TICK)):
            self._tick()
            self._first_beats()
        self.fair_after_wait |= {j for j in self.jobs if self.fair_game(j.worker, j)}

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
        self.fair_after_wait = set()
        protected = [
            j for j in self.jobs if j.running and not j.settled and not self.fair_game(j.worker, j)
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
            if j in self.fair_after_wait:
                continue
            assert not j.settled, (
                f"§2.1 violated: {j!r} was settled by {_describe(reaps)} while its task ran "
                f"(its worker: alive, paused={j.worker.paused}, busy={j.worker.busy}, "
                f"taken {self.now - j.taken_at:g} s ago, last heartbeat "
                f"{self.now - j.worker.last_heartbeat:g} s ago, skew {j.worker.skew:g} s)"
            )
        for j, r, why in owed:
            assert j.settled, f"bound violated: {_describe([r])} left {j!r} running; {why}"

    def _run(self, r: Reap) -> None:
        kwargs: dict[str, Any] = {
            "me": None if r.worker is None else r.worker.me,
            "ping": lambda nodes, timeout: self.ping(nodes, timeout, r.worker),
            "ask": self.ask,
        }
        if HAS_HELD and r.worker is not None:
            held = set(r.held)
            kwargs["held"] = lambda: set(held)
        if r.worker is not None:  # a worker's reaper lives on; one from outside is new
            kwargs["sightings"] = self.sightings_of(r.worker)
        reaper = Reaper(self.env.app, self.env.settings, self.env.db, **kwargs)
        with host_clock(r.skew):
            reaper.run(r.trigger)

    def sightings_of(self, w: Worker) -> ModelSightings:
        """The first sightings of *w*'s reaper (one per incarnation, from its start)."""
        if w not in self.sightings:
            self.sightings[w] = ModelSightings(lambda: self.now)
        return self.sightings[w]

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
        for store in self.sightings.values():
            store.shift(delta)
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
