"""Crash scenarios proved with real ``celery worker`` processes, PostgreSQL and Redis.

Every worker here is a real subprocess (``tests/workerapp.py``) in its own process group, so
"SIGKILL", "SIGSTOP" and "restart" mean exactly what they mean in production. The tests wait on
what the processes write (marker files, log lines, database rows) and never on the clock;
timeouts are only failure guards.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from jobtables import SEED_SOURCE, create_seed
from sqlalchemy import Table, func, insert, select
from sqlalchemy.engine import Engine, Row
from support import REDIS_URL, WorkerProcess, wait_until

from celery_jobreaper.clock import utcnow
from celery_jobreaper.schema import tables

pytestmark = pytest.mark.slow

#: Settings of ``workerapp`` (heartbeat every 1 s, timeout 3 s, reap every 1 s, ping 0.5 s).
HEARTBEAT_TIMEOUT = timedelta(seconds=3)
#: A closed TCP port on localhost: connecting is refused at once.
CLOSED_DB_URL = "postgresql+psycopg://postgres@127.0.0.1:1/x"
READY = r"@h ready\."


@dataclasses.dataclass
class Cluster:
    """One test's world: a fresh database, a unique queue, a producer, and worker starters."""

    tmp: Path
    db: Engine
    db_url: str
    queue: str
    unique: str
    producer: Celery
    starter: Callable[..., WorkerProcess]

    def worker(
        self,
        name: str,
        *,
        queue: str | None = None,
        db_url: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> WorkerProcess:
        """Start ``celery -A workerapp worker -n <name>`` (does not wait for it)."""
        env = {
            "JR_BROKER_URL": REDIS_URL,
            "JR_DATABASE_URL": db_url or self.db_url,
            "JR_QUEUE": queue or self.queue,
            "JR_SETTINGS": json.dumps(settings or {}),
            "JR_ACKS_LATE": "0",
        }
        return self.starter(name, env=env)

    def ready_worker(self, name: str, **kwargs: Any) -> WorkerProcess:
        """Start a worker and wait until it consumes."""
        worker = self.worker(name, **kwargs)
        worker.wait_for(READY, timeout=60)
        return worker

    def send(self, seconds: float, tag: str, *, queue: str | None = None) -> str:
        """Send ``jr.sleep(seconds, tag=tag)``; return its task id."""
        result = self.producer.send_task(
            "jr.sleep", args=(seconds,), kwargs={"tag": tag}, queue=queue or self.queue
        )
        return str(result.id)

    def marker(self, name: str) -> Path:
        return self.tmp / name

    def wait_running(self, tag: str, task_id: str) -> Row[Any]:
        """Wait until the task body runs (marker file) and return its tracked row."""
        wait_until(lambda: self.marker(f"started-{tag}").exists(), 60, f"task {tag} to start")
        # The pool process's tracking writer records the start within a few milliseconds.
        row: Row[Any] = wait_until(
            lambda: self.job(task_id), 10, "jobreaper_jobs to have a row for the running task"
        )
        assert row.status == "running"
        return row

    # --- reading jobreaper's tables ------------------------------------------------------

    def job(self, task_id: str) -> Row[Any] | None:
        with self.db.connect() as conn:
            return conn.execute(select(tables.jobs).where(tables.jobs.c.task_id == task_id)).first()

    def events(self, task_id: str | None = None) -> list[Row[Any]]:
        query = select(tables.events).order_by(tables.events.c.id)
        if task_id is not None:
            query = query.where(tables.events.c.task_id == task_id)
        with self.db.connect() as conn:
            return list(conn.execute(query))

    def run(self, run_id: int) -> Row[Any]:
        """The run's row once it has finished (its counts are written at the end)."""

        def finished() -> Row[Any] | None:
            with self.db.connect() as conn:
                row = conn.execute(select(tables.runs).where(tables.runs.c.id == run_id)).first()
            assert row is not None, f"no jobreaper_runs row {run_id}"
            return row if row.finished_at is not None else None

        row: Row[Any] = wait_until(finished, 30, f"run {run_id} to finish")
        return row

    def finished_runs(self, incarnation_id: str, trigger: str) -> list[Row[Any]]:
        r = tables.runs
        with self.db.connect() as conn:
            return list(
                conn.execute(
                    select(r)
                    .where(
                        r.c.incarnation_id == incarnation_id,
                        r.c.trigger == trigger,
                        r.c.finished_at.is_not(None),
                    )
                    .order_by(r.c.id)
                )
            )

    def periodic_reaps(self) -> int:
        """Periodic reaps finished by the workers of this test (whoever led the cluster's
        maintenance; idle ones too, which write no runs row): ``reaps.log`` of workerapp."""
        log = self.tmp / "reaps.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return sum(line.startswith("periodic ") for line in lines)

    def more_periodic_runs(self, n: int = 2) -> None:
        """Wait until the cluster's leader finished *n* more periodic reaps."""
        seen = self.periodic_reaps()
        wait_until(lambda: self.periodic_reaps() >= seen + n, 30, f"{n} more periodic reaps")

    def incarnation(self, worker: WorkerProcess) -> Row[Any]:
        """The incarnation row of this worker process (its main process pid and node name)."""
        t = tables.incarnations

        def find() -> Row[Any] | None:
            with self.db.connect() as conn:
                return conn.execute(
                    select(t).where(t.c.node == worker.name, t.c.pid == worker.pid)
                ).first()

        row: Row[Any] = wait_until(find, 30, f"incarnation row of {worker.name}")
        return row

    def incarnation_by_id(self, incarnation_id: str) -> Row[Any]:
        t = tables.incarnations
        with self.db.connect() as conn:
            row = conn.execute(select(t).where(t.c.id == incarnation_id)).first()
        assert row is not None
        return row


@pytest.fixture
def cluster(
    tmp_path: Path,
    pg_url: str,
    unique: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> Iterator[Cluster]:
    """A fresh PostgreSQL database, a unique Redis queue, and a producer app on that broker."""
    producer = Celery(f"jr-producer-{unique}", broker=REDIS_URL, set_as_current=False)
    queue = f"jrq-{unique}"
    try:
        yield Cluster(tmp_path, engine_for(pg_url), pg_url, queue, unique, producer, start_worker)
    finally:
        producer.close()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for name in (queue, f"{queue}-b"):
                client.delete(name, *(f"{name}\x06\x16{p}" for p in (3, 6, 9)))
                client.delete(f"_kombu.binding.{name}")
        finally:
            client.close()


def _process_gone(pid: int) -> bool:
    """Whether *pid* no longer runs (absent, or a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def _exit_code(worker: WorkerProcess, timeout: float = 30.0) -> int:
    """Wait for a worker that is expected to refuse to start; return its exit code."""
    try:
        return worker.proc.wait(timeout=timeout)
    except Exception as error:  # pragma: no cover - failure guard
        raise AssertionError(f"worker {worker.name} did not exit:\n{worker.output()}") from error


# --- 1 ------------------------------------------------------------------------------------


def test_sigkill_mid_task_then_restart_settles_at_startup(cluster: Cluster) -> None:
    """A restarted worker settles its previous incarnation's job at once, before consuming.

    The heartbeat timeout is set to 60 s, so only the "own earlier incarnation is dead by
    definition" rule can settle the job in the startup run.
    """
    name = f"a-{cluster.unique}@h"
    settings = {"heartbeat_timeout": 60}
    first = cluster.ready_worker(name, settings=settings)
    task_id = cluster.send(60, "t1")
    row = cluster.wait_running("t1", task_id)
    old_incarnation = cluster.incarnation(first)
    assert row.incarnation_id == old_incarnation.id and row.node == name
    child_pid = int(cluster.marker("started-t1").read_text())

    first.kill()  # SIGKILL to the whole group: main process and pool child
    wait_until(lambda: _process_gone(child_pid), 30, "the pool child to die")
    row = cluster.job(task_id)
    assert row is not None and row.status == "running" and row.completed_at is None
    assert cluster.events(task_id) == []
    last_heartbeat = cluster.incarnation_by_id(old_incarnation.id).heartbeat_at

    second = cluster.ready_worker(name, settings=settings)
    out = second.output()
    clearing = out.find(f"jobreaper: Clearing job: {task_id}")
    ready = out.find(f"{name} ready.")
    assert clearing != -1, out
    assert clearing < ready, "the job must be settled before the worker consumes"

    row = cluster.job(task_id)
    assert row is not None
    assert row.status == "failed"
    assert row.times_reaped == 1
    assert row.completed_at is not None and row.fence is None
    assert re.search(rf"was running for \d+:\d\d:\d\d on {re.escape(name)}\b", row.error), row.error

    events = cluster.events(task_id)
    assert len(events) == 1, events
    event = events[0]
    assert (event.action, event.previous_status, event.new_status) == (
        "settled",
        "running",
        "failed",
    )
    run = cluster.run(event.run_id)
    new_incarnation = cluster.incarnation(second)
    assert run.trigger == "startup"
    assert run.incarnation_id == new_incarnation.id != old_incarnation.id
    assert run.settled == 1
    # Settled long before a stale heartbeat alone would have made the old owner a suspect.
    assert event.at < last_heartbeat + timedelta(seconds=60)
    assert cluster.incarnation_by_id(old_incarnation.id).state == "dead"
    # Later timer runs find nothing more to do: still exactly one settlement.
    cluster.more_periodic_runs()
    assert len(cluster.events(task_id)) == 1
    assert cluster.job(task_id) == row


# --- 2 ------------------------------------------------------------------------------------


def test_other_workers_job_is_left_alone_until_its_worker_dies(cluster: Cluster) -> None:
    """B restarting and reaping on its timer never touches live A's job; after A dies it does."""
    a_name, b_name = f"a-{cluster.unique}@h", f"b-{cluster.unique}@h"
    b_queue = f"{cluster.queue}-b"  # B never takes A's task from the queue
    # A never leads the cluster's maintenance: B's periodic reaps are the ones that judge A
    a = cluster.ready_worker(a_name, settings={"lead": False})
    task_id = cluster.send(60, "long")
    before = cluster.wait_running("long", task_id)
    a_incarnation = cluster.incarnation(a)

    b1 = cluster.ready_worker(b_name, queue=b_queue)
    b1_id = cluster.incarnation(b1).id
    wait_until(lambda: len(cluster.finished_runs(b1_id, "periodic")) >= 2, 30, "B1 timer reaps")
    assert b1.stop() == 0
    assert cluster.incarnation_by_id(b1_id).state == "stopped"

    b2 = cluster.ready_worker(b_name, queue=b_queue)
    b2_id = cluster.incarnation(b2).id
    assert b2_id != b1_id
    periodic = wait_until(
        lambda: (runs := cluster.finished_runs(b2_id, "periodic")) and len(runs) >= 3 and runs,
        30,
        "B2 timer reaps",
    )

    row = cluster.job(task_id)
    assert row is not None
    assert (row.status, row.fence, row.times_reaped, row.error) == (
        "running",
        before.fence,
        0,
        None,
    )
    assert cluster.events() == []
    # B saw A's job on every run, and left it alone each time.
    b_runs = [
        *cluster.finished_runs(b1_id, "startup"),
        *cluster.finished_runs(b1_id, "periodic"),
        *cluster.finished_runs(b2_id, "startup"),
        *periodic,
    ]
    assert len(b_runs) >= 7
    for run in b_runs:
        assert (run.candidates, run.settled, run.left_alone, run.error) == (1, 0, 1, None), run
    assert cluster.incarnation_by_id(a_incarnation.id).state == "running"
    assert "Clearing job" not in b1.output() + b2.output()

    a.kill()
    failed = wait_until(
        lambda: (r := cluster.job(task_id)) is not None and r.status == "failed" and r,
        60,
        "B to settle A's job",
    )
    last_heartbeat = cluster.incarnation_by_id(a_incarnation.id).heartbeat_at
    events = cluster.events()
    assert len(events) == 1, events
    event = events[0]
    assert event.task_id == task_id and event.action == "settled"
    run = cluster.run(event.run_id)
    assert (run.trigger, run.incarnation_id, run.settled) == ("periodic", b2_id, 1)
    # Dead on two signals: the heartbeat had been stale for the timeout, and no ping reply.
    assert event.at >= last_heartbeat + HEARTBEAT_TIMEOUT
    assert a_name in failed.error and "no reply to ping" in failed.error
    assert failed.times_reaped == 1
    assert cluster.incarnation_by_id(a_incarnation.id).state == "dead"
    b2.wait_for(f"jobreaper: Clearing job: {re.escape(task_id)}")
    cluster.more_periodic_runs()
    assert len(cluster.events()) == 1
    assert cluster.job(task_id) == failed


# --- 3 ------------------------------------------------------------------------------------


def test_paused_worker_late_result_is_fenced(cluster: Cluster) -> None:
    """A worker frozen past the timeout is settled; its late success does not overwrite that."""
    a_name, b_name = f"a-{cluster.unique}@h", f"b-{cluster.unique}@h"
    b = cluster.ready_worker(b_name, queue=f"{cluster.queue}-b")
    b_id = cluster.incarnation(b).id
    a = cluster.ready_worker(a_name)
    task_id = cluster.send(8, "paused")
    cluster.wait_running("paused", task_id)

    a.signal(signal.SIGSTOP)  # main process and pool child: no heartbeat, no ping reply
    try:
        settled = wait_until(
            lambda: (r := cluster.job(task_id)) is not None and r.status == "failed" and r,
            60,
            "B to settle the frozen worker's job",
        )
        assert not cluster.marker("finished-paused").exists()
        events = cluster.events(task_id)
        assert [e.action for e in events] == ["settled"]
        run = cluster.run(events[0].run_id)
        assert (run.trigger, run.incarnation_id) == ("periodic", b_id)
    finally:
        a.signal(signal.SIGCONT)

    wait_until(lambda: cluster.marker("finished-paused").exists(), 60, "the task to finish")

    def late_events() -> list[Row[Any]]:
        row = cluster.job(task_id)
        assert row is not None and row.status == "failed", f"the late result overwrote: {row}"
        return [e for e in cluster.events(task_id) if e.action == "late_result"]

    late = wait_until(late_events, 30, "the late result in the ledger")
    assert len(late) == 1
    assert late[0].new_status == "succeeded"
    a.wait_for(rf"jobreaper: late result for task {re.escape(task_id)}")
    a.wait_for(r"was declared dead by another reaper")

    row = cluster.job(task_id)
    assert row is not None
    assert (row.status, row.error, row.completed_at, row.times_reaped) == (
        "failed",
        settled.error,
        settled.completed_at,
        1,
    )
    assert [e.action for e in cluster.events(task_id)] == ["settled", "late_result"]


def test_paused_worker_late_write_to_a_user_table_is_recorded_once(cluster: Cluster) -> None:
    """A user-table job of a frozen worker is settled; when the worker wakes up, its task's own
    (unfenced) completion UPDATE overwrites the row: that cannot be blocked, but the next reap
    records it in the ledger once, logs it, and later reaps do not record it again."""
    create_seed(cluster.db, [], owner=True, task_id=True)
    source = {**SEED_SOURCE, "owner": "owner", "task_id": "task_id"}
    settings = {"sources": [source], "track_tasks": False}
    a_name, b_name = f"a-{cluster.unique}@h", f"b-{cluster.unique}@h"
    b = cluster.ready_worker(b_name, queue=f"{cluster.queue}-b", settings=settings)
    cluster.incarnation(b)  # registered
    a = cluster.ready_worker(a_name, settings=settings)
    cluster.producer.send_task(
        "jr.job", args=("late-1", 6), kwargs={"fenced": False}, queue=cluster.queue
    )
    wait_until(lambda: cluster.marker("started-late-1").exists(), 60, "the job to start")

    def status() -> str | None:
        with cluster.db.connect() as conn:
            value = conn.exec_driver_sql(
                "SELECT status FROM system_jobs WHERE job_id = 'late-1'"
            ).scalar()
        return None if value is None else str(value)

    a.signal(signal.SIGSTOP)  # main process and pool child: no heartbeat, no ping reply
    try:
        wait_until(lambda: status() == "failed", 60, "B to settle the frozen worker's job")
        assert [e.action for e in cluster.events() if e.job_id == "late-1"] == ["settled"]
    finally:
        a.signal(signal.SIGCONT)
    wait_until(lambda: cluster.marker("finished-late-1").exists(), 60, "the task to finish")
    assert status() == "completed"  # the application's own UPDATE is not blocked

    def late() -> list[Row[Any]]:
        return [e for e in cluster.events() if e.action == "late_write"]

    [event] = wait_until(late, 30, "the late write in the ledger")
    assert (event.job_id, event.source, event.previous_status, event.new_status) == (
        "late-1",
        "system_jobs",
        "failed",
        "completed",
    )
    assert event.owner == a_name and event.task_id is not None
    line = "jobreaper: late write to system_jobs job late-1"
    wait_until(lambda: line in a.output() + b.output(), 30, "the late write logged")
    cluster.more_periodic_runs(3)
    assert len(late()) == 1
    assert (a.output() + b.output()).count(line) == 1


# --- 4 ------------------------------------------------------------------------------------


def test_database_unreachable_worker_still_starts_and_retries(cluster: Cluster) -> None:
    """Invariant 7: no database, the worker starts anyway, consumes, and jobreaper retries."""
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", 1), timeout=1):
        pass  # precondition: the port really is closed
    name = f"a-{cluster.unique}@h"
    worker = cluster.ready_worker(name, db_url=CLOSED_DB_URL, settings={"connect_timeout": 1})
    cluster.send(0, "quick")
    wait_until(lambda: cluster.marker("finished-quick").exists(), 60, "the task to run")
    out = worker.wait_for(r"Task jr\.sleep\[[^\]]+\] succeeded")
    # The startup failure is logged with its traceback, before the worker is ready.
    failed_at = out.find("ERROR/MainProcess] jobreaper: startup reap failed")
    assert failed_at != -1, out
    assert failed_at < out.find(f"{name} ready.")
    assert "Traceback (most recent call last)" in out[failed_at:]
    assert "OperationalError" in out[failed_at:]
    # ... and the timer keeps retrying (and failing) afterwards: the first failure with its
    # traceback, the same failure again as one line.
    worker.wait_for(r"jobreaper: jobreaper-reaper failed; retrying")
    worker.wait_for(r"jobreaper: jobreaper-reaper failed again \(OperationalError", count=2)
    assert worker.proc.poll() is None


def test_database_unreachable_in_strict_mode_refuses_to_start(cluster: Cluster) -> None:
    """With jobreaper_strict, the same failure stops the worker before it consumes."""
    worker = cluster.worker(
        f"a-{cluster.unique}@h",
        db_url=CLOSED_DB_URL,
        settings={"connect_timeout": 1, "strict": True},
    )
    code = _exit_code(worker)
    out = worker.output()
    assert code != 0, out
    assert "ready." not in out
    assert "jobreaper_strict" in out, out


# --- 5 ------------------------------------------------------------------------------------


def _create_system_jobs(engine: Engine) -> Table:
    """The seed's ``system_jobs`` table, empty."""
    return create_seed(engine, [])


def test_invalid_setting_stops_worker_naming_the_key(cluster: Cluster) -> None:
    """Invalid configuration is the exception to "always starts": the error names the key."""
    worker = cluster.worker(f"a-{cluster.unique}@h", settings={"interval": -5})
    code = _exit_code(worker)
    out = worker.output()
    assert code != 0, out
    assert "ready." not in out
    assert "jobreaper: invalid setting jobreaper_interval" in out, out


def test_source_with_missing_column_stops_worker_naming_the_key(cluster: Cluster) -> None:
    """A source mapping a role to a column the table lacks is found at start and named."""
    _create_system_jobs(cluster.db)
    worker = cluster.worker(
        f"a-{cluster.unique}@h", settings={"sources": [{**SEED_SOURCE, "status": "state"}]}
    )
    code = _exit_code(worker)
    out = worker.output()
    assert code != 0, out
    assert "ready." not in out
    assert "jobreaper: invalid setting jobreaper_sources[0].status" in out, out
    assert "has no column 'state'" in out, out


# --- 6 ------------------------------------------------------------------------------------


def test_seed_system_jobs_end_to_end(cluster: Cluster) -> None:
    """The seed's scenario: a job stuck 'running' for a day is failed at worker start."""
    table = _create_system_jobs(cluster.db)
    now = utcnow()
    with cluster.db.begin() as conn:
        conn.execute(
            insert(table),
            [
                {
                    "job_id": "scan_library_123abc",
                    "job_type": "library_scan",
                    "status": "running",
                    "started_at": now - timedelta(hours=24),
                },
                {
                    "job_id": "identify_456def",
                    "job_type": "file_identification",
                    "status": "completed",
                    "started_at": now - timedelta(hours=2),
                    "completed_at": now - timedelta(hours=1),
                },
            ],
        )
    with cluster.db.connect() as conn:
        completed_before = conn.execute(
            select(table).where(table.c.job_id == "identify_456def")
        ).one()

    name = f"a-{cluster.unique}@h"
    worker = cluster.ready_worker(name, settings={"sources": [SEED_SOURCE]})
    out = worker.output()
    clearing = out.find("jobreaper: Clearing job: scan_library_123abc (library_scan)")
    assert clearing != -1, out
    assert clearing < out.find(f"{name} ready.")

    with cluster.db.connect() as conn:
        stuck = conn.execute(select(table).where(table.c.job_id == "scan_library_123abc")).one()
        completed = conn.execute(select(table).where(table.c.job_id == "identify_456def")).one()
        not_failed = conn.execute(
            select(func.count()).select_from(table).where(table.c.status != "failed")
        ).scalar_one()
    assert stuck.status == "failed"
    assert stuck.completed_at is not None and stuck.completed_at >= now
    assert "was running for 1 day, " in stuck.error, stuck.error
    assert completed == completed_before
    assert not_failed == 1

    events = [e for e in cluster.events() if e.source == "system_jobs"]
    assert [(e.job_id, e.action, e.kind) for e in events] == [
        ("scan_library_123abc", "settled", "library_scan")
    ]
    assert cluster.run(events[0].run_id).trigger == "startup"
    cluster.more_periodic_runs()
    assert len([e for e in cluster.events() if e.source == "system_jobs"]) == 1
