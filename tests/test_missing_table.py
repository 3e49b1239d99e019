"""A configured table that does not exist yet (its migration runs after the workers roll out):
the worker starts, registers, reaps its other sources, and picks the table up once it exists
(issue 6 item 10, DESIGN §2.7); only ``jobreaper_strict`` refuses to start."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

from jobtables import SEED_SOURCE, create_seed
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from support import WorkerProcess, wait_until, worker_env

MISSING = "jobreaper: jobreaper_sources[0].table: no table named 'system_jobs'"


def test_worker_starts_while_the_configured_table_is_not_migrated_yet(
    pg_url: str,
    unique: str,
    start_worker: Callable[..., WorkerProcess],
    engine_for: Callable[[str], Engine],
) -> None:
    env = {
        **worker_env(pg_url, f"q-{unique}", sources=[SEED_SOURCE]),
        "JR_KEYPREFIX": f"jrs-{unique}:",
    }
    name = f"nomig-{unique}@h"
    worker = start_worker(name, env=env)
    worker.wait_for(f"{name} ready.")
    worker.wait_for(re.escape(MISSING))
    engine = engine_for(pg_url)
    with engine.connect() as conn:  # registered: other workers count it as live
        states = conn.execute(
            text("SELECT state FROM jobreaper_incarnations WHERE node = :n"), {"n": name}
        ).scalars()
        assert list(states) == ["running"]
    worker.wait_for("jobreaper: No stale jobs found", count=1)  # periodic reaps go on
    # The migration runs: a job left running by a worker that died before this one started.
    table = create_seed(engine, [{"job_id": "left-behind"}])
    worker.wait_for("jobreaper: jobreaper_sources\\[0\\].table exists now")

    def status() -> str:
        with engine.connect() as conn:
            return str(conn.execute(select(table.c.status)).scalar_one())

    wait_until(lambda: status() == "failed", timeout=60, what="the job settled")
    assert worker.output().count(MISSING) == 1, worker.output()  # said once, not every reap
    assert worker.proc.poll() is None


def test_missing_table_in_strict_mode_refuses_to_start(
    pg_url: str, unique: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    env = worker_env(pg_url, f"q-{unique}", sources=[SEED_SOURCE], strict=True)
    worker = start_worker(f"nomig-strict-{unique}@h", env=env)
    try:
        code = worker.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = None
    out = worker.output()
    assert code not in (None, 0), out
    assert " ready." not in out
    assert "jobreaper_strict" in out, out
    assert "no table named 'system_jobs'" in out, out
