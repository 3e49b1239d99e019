"""A configured table that does not exist yet (its migration runs after the workers roll out):
the worker starts, registers, reaps its other sources, and picks the table up once it exists
(issue 6 item 10, DESIGN §2.7); only ``jobreaper_strict`` refuses to start."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
from jobtables import SEED_SOURCE, create_seed
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from support import ROOT, TESTS, WorkerProcess, make_app, wait_until, worker_env

from celery_jobreaper.database import Database
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import create_all
from celery_jobreaper.settings import Settings
from celery_jobreaper.vocabulary import PERIODIC

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


TYPO_SOURCE = {**SEED_SOURCE, "table": "sytem_jobs"}


def test_mistyped_table_warning_names_the_key_suggests_close_names_and_repeats_rarely(
    sqlite_url: str, engine_for: Callable[[str], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    create_seed(engine_for(sqlite_url), [])  # system_jobs exists; the setting says sytem_jobs
    app = make_app(sqlite_url, sources=[TYPO_SOURCE])
    settings = Settings.from_app(app)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "sytem_jobs" in r.getMessage()]

    caplog.set_level(logging.WARNING, logger="celery_jobreaper")
    reaper = Reaper(app, settings, Database.from_settings(settings), skip_missing_tables=True)
    for _ in range(3):
        reaper.run(PERIODIC)
    [line] = warnings()  # once, not every reap
    assert line.startswith(
        "jobreaper: jobreaper_sources[0].table: no table named 'sytem_jobs' in the database"
    ), line
    assert "did you mean 'system_jobs'?" in line, line
    assert "looked up again on every reap" in line, line
    assert reaper.missing_sources == {
        "jobreaper_sources[0].table": reaper.missing_sources["jobreaper_sources[0].table"]
    }
    reaper.db.dispose()

    caplog.clear()
    again = Reaper(
        app,
        settings,
        Database.from_settings(settings),
        skip_missing_tables=True,
        missing_table_repeat=0,
    )
    for _ in range(3):
        again.run(PERIODIC)
    assert len(warnings()) == 3  # repeated once the interval has passed
    again.db.dispose()


def test_status_command_shows_the_missing_table(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    create_seed(engine, [])
    create_all(engine)  # a cluster ran: jobreaper's own tables exist
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        **worker_env(sqlite_url, "q-status", sources=[TYPO_SOURCE]),
    }
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workerapp", "jobreaper", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "missing tables (1): their jobs are not reaped until they exist" in out, out
    assert (
        "  jobreaper_sources[0].table: no table named 'sytem_jobs' in the database "
        "(a migration not run yet?); did you mean 'system_jobs'?"
    ) in out, out
