"""The state of the simulated cluster, and what DESIGN demands of the reaper in that state."""

from __future__ import annotations

from collections import Counter

from modelworld import (
    FRESH_MARGIN,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    INTERVAL,
    SKEWS,
    STALE_SLACK,
    TICK,
    TRACKED,
    USER_TABLES,
    Job,
    ModelSightings,
    Reap,
    Worker,
)

#: Seconds a row of a worker's current start whose task it no longer holds is left alone: a task
#: may be only now being taken, or writing its end (the product's margin, README "A pool
#: process dies").
MARGIN = HEARTBEAT_INTERVAL


class ClusterState:
    """Workers and jobs in model time; the verdicts the design allows and the ones it owes."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.workers: list[Worker] = []  # every incarnation ever started
        self.jobs: list[Job] = []
        self.lost: Counter[str] = Counter()  # node -> ping replies still to be lost
        #: each worker's reaper remembers when it first saw jobs whose start is unknown
        self.sightings: dict[Worker, ModelSightings] = {}

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

    def fair_game(self, w: Worker, j: Job | None = None) -> bool:
        """The design accepts settling the running jobs of *w* (or its job *j*): it shows both
        death signals.

        Its heartbeat is about ``heartbeat_timeout`` old and it does not answer (it is paused,
        busy in a ``-P solo`` task, or a ping reply of its node is to be lost); a paused worker
        that wakes finds its jobs settled, and fencing keeps its late results out (DESIGN §2.1,
        §2.4). Dead is not forever: a job without owner that *w* started after its last
        heartbeat (woken from a pause, before its first heartbeat) needs silence measured
        after the job appeared: if it started after *w*'s last heartbeat, the silence counts
        from its start (less a writer's clock running behind, which makes the row look that
        much older: the documented limit of ``started_at``; a row whose start is unknown
        is aged by when a reaper first saw it, never before it was written). The same holds
        for a user row with an owner column. A tracked job is written with a heartbeat of its
        worker (the tracker vouches for it): its silence counts from that heartbeat.
        """
        since = w.last_heartbeat
        if j is not None and j.kind != TRACKED and j.taken_at > w.last_heartbeat:
            since = max(since, j.taken_at + (0.0 if j.unstarted else min(j.skew, 0.0)))
        stale = self.now - since >= HEARTBEAT_TIMEOUT - FRESH_MARGIN
        return stale and (w.paused or w.busy or self.lost[w.node] > 0)

    def obligation(self, j: Job, r: Reap) -> str | None:
        """Why reap *r* must settle the ghost *j* (``None``: it need not).

        * tracked job of a dead incarnation (heartbeat stale, no answer), or of an earlier
          start of the reaper's own node (DESIGN §2.1, §2.2);
        * tracked job whose pool process died: its worker's failure signal settled it (§4);
        * user row with an owner column: of an earlier start of the reaper's node (started
          before this start, or older than ``heartbeat_interval``), when its task id shows that
          no task of the reaper's worker runs it or, without task-id column, when that worker
          holds no task at all (§2.2); of a node all of whose incarnations are dead (§2.1);
          with a task-id column too, owned by the reaper's own worker, whose pool process died:
          its periodic reap, as the worker no longer holds the task, once the row is older
          than ``heartbeat_interval`` (§4 and the margin README promises: a task just taken,
          or writing its end, is not misjudged);
        * user row without owner column (task-id column or not): only when no worker could be
          running it: every other incarnation is dead, and the reaper is not a worker, or is at
          its startup, or holds no task (§4; otherwise only ``max_age``, not set here, may),
          and it is older than ``heartbeat_timeout`` on any clock (a worker woken from a pause
          may have started it before its first heartbeat: §2.1); a row whose start is unknown
          once the reaper (a worker's, which lives on: one from outside is new and has seen
          nothing) first saw it more than ``heartbeat_timeout`` ago.
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
                    if _has_task and r.trigger == "periodic" and self.row_age(j, r) > MARGIN:
                        return (
                            "its pool process died; its worker no longer holds its task and "
                            "the row is older than heartbeat_interval (§4)"
                        )
                    return None
                if _has_task or not r.held:
                    # not run by a task of the reaper's worker: known exactly, by its task id,
                    # or because that worker holds no task at all (no clocks involved)
                    if j.started_at < me.me.started_at:
                        return "owned by the reaper's node and started before this start (§2.2)"
                    if self.row_age(j, r) > MARGIN:
                        return (
                            "owned by the reaper's node, no task of its worker runs it, and the "
                            "row is older than heartbeat_interval (§2.2, §4)"
                        )
                # while the reaper's worker holds tasks, a row without task id may be one of
                # them, however old its start looks (clocks step): only max_age may settle it
                return None
            node = [w for w in self.workers if w.node == owner.node]
            if self.may_have_woken(j, node):
                return None
            if all(self.looks_dead(w) for w in node):
                return "every incarnation of its owner node is dead (§2.1)"
            return None
        if j.unstarted:
            first = None
            if me is not None and me in self.sightings:
                first = self.sightings[me].model_first(j.kind, j.job_id)
            young = first is None or self.now - first <= HEARTBEAT_TIMEOUT + STALE_SLACK
        else:
            young = self.row_age(j, r) <= HEARTBEAT_TIMEOUT + STALE_SLACK
        if (
            not young
            and all(self.looks_dead(w) for w in self.workers if w is not me)
            and (me is None or r.trigger == "startup" or not r.held)
        ):
            return "no owner column and no worker could be running it (§4)"
        return None

    def may_have_woken(self, j: Job, node: list[Worker]) -> bool:
        """Whether the owner-column row of *j* may look started after its node's last
        heartbeat and younger than ``heartbeat_timeout`` (on the writer's clock against the
        database's): its owner may be back from a pause, so it waits for the timeout (§2.1)."""
        last = max(w.last_heartbeat for w in node)
        return (
            j.taken_at + max(j.skew, 0.0) > last - STALE_SLACK
            and self.now - (j.taken_at + min(j.skew, 0.0)) < HEARTBEAT_TIMEOUT + STALE_SLACK
        )

    def row_age(self, j: Job, r: Reap) -> float:
        """The least age the user-table row of *j* may have to reap *r*, in seconds.

        Its ``started_at`` carries the clock of the host that wrote it; the reaper's clock may
        be its host's or the database server's: a row stamped by a host whose clock runs ahead
        is that much younger.
        """
        return self.now - j.taken_at - j.skew + min(r.skew, 0.0)

    def deadline(self, j: Job) -> float | None:
        """Model time by which the ghost *j* must be settled (the bound), if one applies.

        A dead worker's job becomes provable ``heartbeat_timeout`` after its last heartbeat; a
        pool process's user row (owner and task-id columns) once it is older than
        ``heartbeat_interval`` (on the reaper's clock, which may run behind). From then on, a worker
        that stays awake reaps within ``interval`` (plus one tick of the model's clock), so the
        job is settled within ``heartbeat_timeout + interval`` of its worker's last sign of life.
        Ownerless rows have no bound while other workers live (DESIGN §4); when none does, each
        reap that owes one settles it (:meth:`obligation`, checked per reap): one older than
        ``heartbeat_timeout``, or, with its start unknown, one the reaping worker first saw
        more than ``heartbeat_timeout`` ago — so a leader reaping every ``interval`` settles
        such a row by first sighting + ``heartbeat_timeout + interval``.
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
            if j.kind != TRACKED:  # started after the last heartbeat: the timeout from its start
                provable = max(
                    provable, j.taken_at + max(j.skew, 0.0) + HEARTBEAT_TIMEOUT + STALE_SLACK
                )
            reapers = [w for w in self.awake() if w.node != owner.node]
        elif j.kind != TRACKED and has_task and owner.alive:
            assert j.died_at is not None
            # ... once the row is older than ``heartbeat_interval`` (on any clock), too.
            provable = max(j.died_at, j.taken_at + j.skew - min(SKEWS) + MARGIN + STALE_SLACK)
            reapers = [owner] if not owner.paused else []
        else:
            return None
        if any(w.awake_since <= provable for w in reapers):
            return provable + INTERVAL + TICK
        return None
