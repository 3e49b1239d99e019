"""One maintenance leader among real solo workers on Redis + PostgreSQL (issue 9).

Several ``celery worker -P solo`` processes (``tests/workerapp.py``: heartbeat every 1 s,
timeout 3 s, reap every 1 s, so a lease of 3 s) share a database and a broker. Exactly one of
them runs the periodic reaps (the runs ledger holds only its incarnation); SIGKILLed, another
takes the lease and settles the dead leader's job; SIGSTOPped past the lease timeout and
woken, the old leader writes nothing as leader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Engine
from support import REDIS_URL, ROOT, TESTS, WorkerProcess, wait_until, worker_env

from celery_jobreaper import lease as lease_mod
from celery_jobreaper.clock import db_utcnow
from celery_jobreaper.lease import LeaseState
from celery_jobreaper.schema import tables

pytestmark = pytest.mark.slow
SOURCE = {**SEED_SOURCE, "owner": "owner", "task_id": "task_id"}


class Cluster:
    def __init__(
        self,
        tmp: Path,
        db: Engine,
        db_url: str,
        unique: str,
        starter: Callable[..., WorkerProcess],
    ) -> None:
        self.tmp = tmp
        self.db = db
        self.db_url = db_url
        self.unique = unique
        self.starter = starter
        self.producer = Celery(f"jr-lead-{unique}", broker=REDIS_URL, set_as_current=False)
        self.producer.conf.broker_transport_options = {"global_keyprefix": self.prefix}
        self.table: Table = create_seed(db, [], owner=True, task_id=True)
        self.workers: dict[str, WorkerProcess] = {}  # node name -> worker

    @property
    def prefix(self) -> str:
        return f"jrf-{self.unique}:"

    def queue(self, node: str) -> str:
        return f"jrf-{self.unique}-{node.split('@', maxsplit=1)[0]}"

    def start(self, count: int) -> None:
        for i in range(count):
            name = f"w{i}-{self.unique}@h"
            env = {
                **worker_env(self.db_url, self.queue(name), sources=[SOURCE]),
                "JR_KEYPREFIX": self.prefix,
            }
            self.workers[name] = self.starter(name, env=env, pool="solo")
        for worker in self.workers.values():
            worker.wait_for(r"@h ready\.", timeout=90)

    def cli(self, *args: str) -> str:
        env = {
            **os.environ,
            **worker_env(self.db_url, "unused", sources=[SOURCE]),
            "JR_KEYPREFIX": self.prefix,
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        }
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "workerapp", *args],
            env=env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def job(self, node: str, job_id: str, seconds: float) -> None:
        self.producer.send_task("jr.job", args=(job_id, seconds), queue=self.queue(node))
        wait_until((self.tmp / f"started-{job_id}").exists, 60, f"job {job_id} to start")

    def lease(self) -> LeaseState | None:
        with self.db.connect() as conn:
            return lease_mod.read(conn, tables)

    def leader(self, *, other_than: str | None = None) -> tuple[str, LeaseState]:
        """(node name, lease) of the current live holder (another than *other_than*)."""

        def held() -> LeaseState | None:
            state = self.lease()
            ok = state is not None and state.live and state.holder != other_than
            return state if ok else None

        state = wait_until(held, 60, "a live maintenance lease")
        return state.node, state

    def now(self) -> Any:
        with self.db.connect() as conn:
            return db_utcnow(conn)

    def periodic_runs(self, since: Any = None) -> list[Any]:
        r = tables.runs
        query = select(r).where(r.c.trigger == "periodic")
        if since is not None:
            query = query.where(r.c.started_at >= since)
        with self.db.connect() as conn:
            return list(conn.execute(query.order_by(r.c.id)))

    def status(self, job_id: str) -> str:
        with self.db.connect() as conn:
            return str(
                conn.execute(
                    select(self.table.c.status).where(self.table.c.job_id == job_id)
                ).scalar()
            )

    def settled_by(self, job_id: str) -> list[str | None]:
        """Incarnation ids of the runs whose ledger event settled *job_id*."""
        e, r = tables.events, tables.runs
        with self.db.connect() as conn:
            return list(
                conn.execute(
                    select(r.c.incarnation_id)
                    .select_from(e.outerjoin(r, e.c.run_id == r.c.id))
                    .where(e.c.job_id == job_id, e.c.action == "settled")
                ).scalars()
            )


@pytest.fixture
def cluster(
    tmp_path: Path,
    pg_url: str,
    unique: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> Iterator[Cluster]:
    made = Cluster(tmp_path, engine_for(pg_url), pg_url, unique, start_worker)
    try:
        yield made
    finally:
        made.producer.close()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{made.prefix}*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.mark.parametrize("count", [4, 8])
def test_one_leader_failover_on_sigkill_and_a_woken_leader_is_fenced(
    cluster: Cluster, count: int
) -> None:
    cluster.start(count)
    leader, first = cluster.leader()
    others = [n for n in cluster.workers if n != leader]
    # A long job on a worker that does not lead: every cycle has a candidate (left alone), so
    # every periodic reap writes its runs row; all of them must be the leader's.
    long_node = others[0]
    cluster.job(long_node, "long", 300)
    since = cluster.now()
    wait_until(lambda: len(cluster.periodic_runs(since)) >= 4, 60, "4 periodic reaps")
    runs = cluster.periodic_runs()
    assert {r.incarnation_id for r in runs} == {first.holder}, runs
    assert cluster.status("long") == "running"
    for node, worker in cluster.workers.items():
        led = "leads the cluster's maintenance now" in worker.output()
        assert led == (node == leader), (node, worker.output())
    # Who leads, as each worker says (inspect jobreaper; not the one busy in its job: a busy
    # solo worker answers no control command) and as the database holds it (status).
    asked = [n for n in cluster.workers if n != long_node]
    replies = cluster.producer.control.broadcast(
        "jobreaper", destination=asked, reply=True, timeout=2.0, limit=len(asked)
    )
    said = {node: body for reply in replies for node, body in reply.items()}
    assert set(said) == set(asked)
    assert {n for n, body in said.items() if body["leads"]} == {leader}
    assert {body["leader"]["node"] for body in said.values()} == {leader}
    assert {body["leader"]["generation"] for body in said.values()} == {first.generation}
    status = cluster.cli("jobreaper", "status", "--json")
    shown = json.loads(status)["leader"]
    assert (shown["node"], shown["generation"]) == (leader, first.generation)
    assert shown["age"] > 0
    assert f"maintenance leader: {leader} (generation {first.generation}" in cluster.cli(
        "jobreaper", "status"
    )

    # The leader dies (SIGKILL) while running a job: another takes the lease once it expired,
    # with the next generation, and settles the dead leader's job.
    cluster.job(leader, "victim", 300)
    killed_at = cluster.now()
    cluster.workers[leader].signal(signal.SIGKILL)
    cluster.workers[leader].proc.wait(timeout=30)
    wall = time.monotonic()
    second_node, second = cluster.leader(other_than=first.holder)
    took_over = time.monotonic() - wall
    assert second.generation == first.generation + 1
    assert second.acquired_at >= killed_at
    wait_until(lambda: cluster.status("victim") == "failed", 60, "the dead leader's job settled")
    settled_in = time.monotonic() - wall
    assert cluster.settled_by("victim") == [second.holder]
    assert cluster.status("long") == "running"
    print(
        f"\n{count} workers: new leader {took_over:.1f} s after the SIGKILL "
        f"(lease {second.acquired_at - killed_at} after it on the database clock); "
        f"the dead leader's job settled {settled_in:.1f} s after it"
    )

    # The new leader is paused (SIGSTOP) past the lease timeout: a third worker takes over.
    paused = cluster.workers[second_node]
    paused.signal(signal.SIGSTOP)
    try:
        third_node, third = cluster.leader(other_than=second.holder)
        assert third.generation == second.generation + 1
        # While it sleeps, a ghost job appears (an owner never registered, an hour old): the
        # woken worker would settle it if it still acted as leader.
        with cluster.db.begin() as conn:
            conn.execute(
                insert(cluster.table).values(
                    job_id="ghost",
                    job_type="library_scan",
                    status="running",
                    started_at=ago(hours=1),
                    owner=f"ghost-{cluster.unique}@h",
                    task_id=f"t-ghost-{cluster.unique}",
                )
            )
        woke_at = cluster.now()
    finally:
        paused.signal(signal.SIGCONT)
    # Told at its first heartbeat, or by the fence of its first periodic reap, whichever runs
    # first after waking.
    paused.wait_for(
        "no longer leads the cluster's maintenance|does not hold the maintenance lease", 60
    )
    wait_until(lambda: cluster.status("ghost") == "failed", 60, "the ghost job settled")
    # A job nobody can judge (an owner never registered, its start unknown: left alone) keeps
    # every cycle from being idle, so each periodic reap writes its runs row.
    with cluster.db.begin() as conn:
        conn.execute(
            insert(cluster.table).values(
                job_id="undecidable",
                job_type="library_scan",
                status="running",
                started_at=None,
                owner=f"unknown-{cluster.unique}@h",
            )
        )
    since = cluster.now()
    wait_until(lambda: len(cluster.periodic_runs(since)) >= 3, 60, "3 more periodic reaps")
    after = cluster.periodic_runs(woke_at)
    assert second.holder not in {r.incarnation_id for r in after}, after
    assert {r.incarnation_id for r in cluster.periodic_runs(since)} == {third.holder}
    assert cluster.settled_by("ghost") == [third.holder]
    if second_node != long_node:  # (a paused worker's job is settled: it looks dead)
        assert cluster.status("long") == "running"
    lease_now = cluster.lease()
    assert lease_now is not None
    assert (lease_now.holder, lease_now.generation) == (third.holder, third.generation)
    assert third_node != second_node
