"""The embedded default, end to end: ``python -m celery_jobreaper.demo``.

SQLite for the database and kombu's ``filesystem://`` transport for the broker, so no server is
needed. A real ``celery worker`` starts a job and is SIGKILLed mid-task (a "previous run"); the
job table also holds a job stuck since yesterday by an older crash. A new worker then starts:
jobreaper settles the stale jobs before the worker consumes anything, and the demo prints the
ledger's report.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, create_engine, select
from sqlalchemy.exc import OperationalError

import celery_jobreaper
from celery_jobreaper.clock import utcnow
from celery_jobreaper.schema import tables
from celery_jobreaper.vocabulary import RUNNING, SETTLED, STARTUP

HERE = Path(os.environ.get("JOBREAPER_DEMO_DIR", "jobreaper-demo")).resolve()
NODE = "demo@jobreaper"
jobs_meta = MetaData()
system_jobs = Table(
    "system_jobs",
    jobs_meta,
    Column("job_id", String(64), primary_key=True),
    Column("job_type", String(64)),
    Column("status", String(16), nullable=False),
    Column("started_at", DateTime),
    Column("completed_at", DateTime),
    Column("error", Text),
)


def _folders() -> dict[str, str]:
    broker = HERE / "broker"
    for sub in ("queue", "control", "processed"):
        (broker / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(broker / "queue"),
        "data_folder_out": str(broker / "queue"),
        "control_folder": str(broker / "control"),
        "processed_folder": str(broker / "processed"),
    }


app = Celery("jobreaper_demo", broker="filesystem://")
app.conf.update(
    broker_transport_options=_folders(),
    worker_prefetch_multiplier=1,
    jobreaper_database_url=f"sqlite:///{HERE / 'jobs.db'}",
    jobreaper_sources=[
        {
            "table": "system_jobs",
            "id": "job_id",
            "status": "status",
            "kind": "job_type",
            "started_at": "started_at",
            "completed_at": "completed_at",
            "error": "error",
        }
    ],
    jobreaper_ping_timeout=0.5,
    # A restart right after a kill waits until the earlier start has missed two heartbeats
    # (to tell it from a live duplicate): keep that short for the demo.
    jobreaper_heartbeat_interval=1,
    # A job without owner is failed on "no live worker" only once it is older than this (a
    # worker woken from a pause may be running a younger one): short for the demo too.
    jobreaper_heartbeat_timeout=3,
)
celery_jobreaper.install(app)


@app.task(name="demo.scan_library")
def scan_library(job_id: str) -> str:
    """A long job that records itself in ``system_jobs`` as the seed application did."""
    engine = create_engine(app.conf.jobreaper_database_url)
    with engine.begin() as conn:
        conn.execute(
            system_jobs.insert().values(
                job_id=job_id, job_type="library_scan", status="running", started_at=utcnow()
            )
        )
    (HERE / "started").write_text(job_id)
    time.sleep(600)
    with engine.begin() as conn:
        conn.execute(
            system_jobs.update()
            .where(system_jobs.c.job_id == job_id)
            .values(status="completed", completed_at=utcnow())
        )
    return job_id


def _worker(log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_jobreaper.demo:app",
        "worker",
        "-n",
        NODE,
        "-c",
        "1",
        "-l",
        "info",
        "--without-gossip",
        "--without-mingle",
    ]
    env = {**os.environ, "JOBREAPER_DEMO_DIR": str(HERE)}
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait(predicate: Any, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.stdout.write(log.read_text(errors="replace"))
            raise SystemExit(f"demo: the worker did not reach: {what}")
        time.sleep(0.1)


def _tracked_running(engine: Any) -> bool:
    """Whether ``jobreaper_jobs`` holds a running job (the table may not exist yet)."""
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(tables.jobs.c.task_id).where(tables.jobs.c.status == RUNNING)
            ).first()
    except OperationalError:  # the worker has not created the table yet
        return False
    return row is not None


def _older_than_timeout(engine: Any) -> bool:
    """Whether the running job's row is older than ``jobreaper_heartbeat_timeout``."""
    with engine.connect() as conn:
        started = conn.execute(
            select(system_jobs.c.started_at).where(system_jobs.c.status == "running")
        ).scalar()
    timeout = timedelta(seconds=app.conf.jobreaper_heartbeat_timeout)
    return started is not None and utcnow() - started > timeout


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args(argv)
    for name in ("jobs.db", "started", "run1.log", "run2.log"):
        (HERE / name).unlink(missing_ok=True)
    engine = create_engine(app.conf.jobreaper_database_url)
    jobs_meta.create_all(engine)
    print(f"demo: working in {HERE}")
    print("demo: run 1 - start a worker, give it a job, kill it with SIGKILL mid-task")
    log1 = HERE / "run1.log"
    first = _worker(log1)
    try:
        scan_library.delay("scan_library_123abc")
        _wait((HERE / "started").exists, "the task started", first, log1)
        # Tracking writes a task's start a few milliseconds later, from the pool process: kill
        # only once it is recorded, so the demo always shows the tracked job settled too.
        _wait(lambda: _tracked_running(engine), "the task tracked as running", first, log1)
        # The restart's startup reap fails a job of this ownerless table only if it is older
        # than the heartbeat timeout (README, "Dead is not forever"): kill it once it is.
        _wait(lambda: _older_than_timeout(engine), "the job older than the timeout", first, log1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with engine.begin() as conn:  # and what an older crash left behind
        conn.execute(
            system_jobs.insert(),
            [
                {
                    "job_id": "identify_456def",
                    "job_type": "file_identification",
                    "status": "running",
                    "started_at": utcnow() - timedelta(days=1),
                },
                {
                    "job_id": "titledb_update_789ghi",
                    "job_type": "titledb_update",
                    "status": "completed",
                    "started_at": utcnow() - timedelta(hours=3),
                    "completed_at": utcnow() - timedelta(hours=2),
                },
            ],
        )
    with engine.connect() as conn:
        stuck = conn.execute(select(system_jobs.c.job_id, system_jobs.c.status)).all()
    print(f"demo: worker killed; job table now: {stuck}")

    print("demo: run 2 - start the worker again; jobreaper settles what the dead run left")
    log2 = HERE / "run2.log"
    second = _worker(log2)
    try:
        _wait(lambda: " ready." in log2.read_text(errors="replace"), "ready", second, log2)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    lines = [ln for ln in log2.read_text(errors="replace").splitlines() if "jobreaper:" in ln]
    print("demo: the new worker's jobreaper log lines:")
    for line in lines:
        print("   ", line.split("] ", 1)[-1])
    settled, statuses = _print_report(engine)
    engine.dispose()
    return _verdict(settled, statuses)


#: What the demo promises: both stale jobs failed by the startup reap, the finished one kept.
EXPECTED_SETTLED = {"scan_library_123abc", "identify_456def"}
EXPECTED_STATUSES = {
    "scan_library_123abc": "failed",
    "identify_456def": "failed",
    "titledb_update_789ghi": "completed",
}


def _verdict(settled: set[str], statuses: dict[str, str]) -> int:
    """Check the promise; print one line saying whether it held, and return the exit status."""
    if settled == EXPECTED_SETTLED and statuses == EXPECTED_STATUSES:
        print(
            f"demo: OK: the startup reap settled {len(settled)} stale jobs "
            f"({', '.join(sorted(settled))}) and left the finished one alone"
        )
        return 0
    print(
        f"demo: FAILED: expected {sorted(EXPECTED_SETTLED)} settled and statuses "
        f"{EXPECTED_STATUSES}; got {sorted(settled)} and {statuses}"
    )
    return 1


def _print_report(engine: Any) -> tuple[set[str], dict[str, str]]:
    """Print the startup run's report; return the job ids it settled and every job's status."""
    with engine.connect() as conn:
        run = conn.execute(
            select(tables.runs)
            .where(tables.runs.c.trigger == STARTUP)
            .order_by(tables.runs.c.id.desc())
        ).first()
        jobs = conn.execute(select(system_jobs)).all()
        if run is None:
            print("demo: the new worker recorded no startup reap (see its log above)")
            return set(), {str(j.job_id): str(j.status) for j in jobs}
        events = conn.execute(select(tables.events).where(tables.events.c.run_id == run.id)).all()
    print(
        f"demo: report of the startup reap (run #{run.id} on {run.node}): "
        f"{run.settled} settled, {run.left_alone} left alone, {run.duration:.3f} s"
    )
    for e in events:
        print(
            f"    {e.source}: {e.job_id} ({e.kind}) {e.previous_status} -> {e.new_status}: "
            f"{e.reason}"
        )
    print("demo: system_jobs now:")
    for j in jobs:
        print(f"    {j.job_id:24} {j.status:10} {j.error or ''}")
    settled = {str(e.job_id) for e in events if (e.source, e.action) == ("system_jobs", SETTLED)}
    return settled, {str(j.job_id): str(j.status) for j in jobs}


if __name__ == "__main__":
    raise SystemExit(main())
