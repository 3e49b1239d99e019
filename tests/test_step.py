"""The bootstep in an embedded worker (fast checks) and in real workers (options, inspect, CLI)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker
from jobtables import SEED_SOURCE, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, ROOT, TESTS, WorkerProcess, worker_env

from celery_jobreaper import JobReaperStep
from celery_jobreaper.schema import tables


def test_step_added_by_hand_reaps_at_start_and_marks_stopped(
    pg_url: str, engine_for: Callable[[str], Engine], unique: str
) -> None:
    engine = engine_for(pg_url)
    table = create_seed(engine, [{"job_id": "stuck"}])
    app = Celery("embedded", broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        task_default_queue=f"q-{unique}",
        jobreaper_database_url=pg_url,
        jobreaper_sources=[SEED_SOURCE],
        jobreaper_heartbeat_interval=1,
        jobreaper_heartbeat_timeout=3,
    )
    app.steps["worker"].add(JobReaperStep)  # without install(): must work on its own

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30) as worker:
        step = next(s for s in worker.steps if isinstance(s, JobReaperStep))
        info = step.info(worker)["jobreaper"]
        assert info["enabled"] and info["last_run"]["trigger"] == "startup"
        assert info["last_run"]["settled"] == 1
        with engine.connect() as conn:
            assert conn.execute(select(table.c.status)).scalar() == "failed"
            state = conn.execute(select(tables.incarnations.c.state)).scalar()
        assert state == "running"
    with engine.connect() as conn:  # the embedded worker shuts down via terminate()
        assert conn.execute(select(tables.incarnations.c.state)).scalar() == "stopped"


def _celery(args: list[str], env: dict[str, str], cwd: Path) -> str:
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workerapp", *args],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_dry_run_option_inspect_and_cli(
    pg_url: str,
    engine_for: Callable[[str], Engine],
    unique: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    table = create_seed(engine, [{"job_id": "scan_library_123abc"}])
    # no periodic reaps: a reap a second (workerapp's) while the CLI calls below run (seconds
    # each under load) pushed the startup run out of the runs `status` lists
    env = worker_env(pg_url, f"q-{unique}", sources=[SEED_SOURCE], interval=3600)
    worker = start_worker(f"dry-{unique}@h", env=env, args=("--jobreaper-dry-run",))
    log = worker.wait_for(r" ready\.")
    assert "jobreaper: [dry run] would clear job: scan_library_123abc (library_scan)" in log
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalar() == "running"

    node = f"dry-{unique}@h"
    inspected = _celery(["inspect", "jobreaper", "-d", node, "-j"], env, tmp_path)
    reply = json.loads(inspected)[node]
    assert reply["enabled"] and reply["dry_run"] and reply["last_run"]["would_settle"] == 1
    stats = json.loads(_celery(["inspect", "stats", "-d", node, "-j"], env, tmp_path))
    assert stats[node]["jobreaper"]["incarnation"] == reply["incarnation"]

    plan = _celery(["jobreaper", "plan"], env, tmp_path)
    # the dry-run worker is alive, so a plan from outside must not propose failing its job
    assert "would settle 0 of 1" in plan and "left alone: 1" in plan
    # (every run shown: with a reap a second, the startup run is not among the last 10 on a
    # loaded machine by the time this command runs)
    status = _celery(["jobreaper", "status", "--limit", "1000"], env, tmp_path)
    assert node in status and "startup (dry)" in status
    assert worker.stop() == 0
    with engine.connect() as conn:
        assert conn.execute(select(tables.incarnations.c.state)).scalar() == "stopped"
    reaped = _celery(["jobreaper", "reap"], env, tmp_path)
    assert "settled 1 of 1" in reaped
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalar() == "failed"


def test_without_jobreaper_option_disables_the_step(
    pg_url: str,
    engine_for: Callable[[str], Engine],
    unique: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    table = create_seed(engine, [{"job_id": "stuck"}])
    worker = start_worker(
        f"off-{unique}@h",
        env=worker_env(pg_url, f"q-{unique}", sources=[SEED_SOURCE]),
        args=("--without-jobreaper",),
    )
    log = worker.wait_for(r" ready\.")
    assert "jobreaper:" not in log
    worker.stop()
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalar() == "running"


def test_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    env = {**os.environ, "JOBREAPER_DEMO_DIR": str(tmp_path / "demo"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "celery_jobreaper.demo"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Clearing job: scan_library_123abc (library_scan)" in out.stdout
    assert "Clearing job: identify_456def (file_identification)" in out.stdout
    assert "3 settled, 0 left alone" in out.stdout
    assert re.search(r"was running for 1 day, 0:00:0\d", out.stdout), out.stdout
