"""Remote control: ``control jobreaper_reap`` and ``jobreaper plan|reap --on`` against real
workers on Redis and RabbitMQ; the consumer only queues the request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import Table, select
from sqlalchemy.engine import Engine
from support import (
    AMQP_URL,
    REDIS_URL,
    ROOT,
    TESTS,
    WorkerProcess,
    make_app,
    wait_until,
    worker_env,
)

from celery_jobreaper import native
from celery_jobreaper.cli import EXIT_FAILED, EXIT_NO_REPORT, EXIT_OK
from celery_jobreaper.database import Database
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.remote import ReapRequest, RemoteReaps
from celery_jobreaper.schema import tables
from celery_jobreaper.settings import Settings
from celery_jobreaper.vocabulary import REMOTE

#: The periodic reap never comes during a test: only the remote request settles anything.
QUIET = {"sources": [SEED_SOURCE], "interval": 3600, "ping_timeout": 0.3, "lead": False}


def celery(broker: str, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A workerapp *args`` as a subprocess (the command line an operator types)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        **worker_env(db_url, "unused", broker=broker, **QUIET),
    }
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workerapp", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _statuses(engine: Engine, table: Table) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.job_id: r.status for r in conn.execute(select(table))}


def _worker(
    start_worker: Callable[..., WorkerProcess], broker: str, db_url: str, **settings: Any
) -> WorkerProcess:
    node = f"remote-{uuid.uuid4().hex[:8]}@jrtest"
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = start_worker(node, env=worker_env(db_url, queue, broker=broker, **QUIET, **settings))
    worker.wait_for(r"ready\.")
    return worker


@pytest.mark.parametrize(
    "broker",
    [
        REDIS_URL,
        # one vhost: its broadcasts reach every worker on it (one xdist process for them all)
        pytest.param(AMQP_URL, marks=pytest.mark.xdist_group("rabbitmq")),
    ],
    ids=["redis", "rabbitmq"],
)
def test_plan_then_reap_on_a_worker_prints_its_reports(
    broker: str,
    pg_url: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    table = create_seed(engine, [])  # empty at the start: the startup reap finds nothing
    worker = _worker(start_worker, broker, pg_url)
    with engine.begin() as conn:  # a job nobody runs, appearing after the worker started
        conn.execute(
            table.insert(),
            [
                {
                    "job_id": "ghost",
                    "job_type": "library_scan",
                    "status": "running",
                    "started_at": ago(hours=2),
                },
            ],
        )

    planned = celery(broker, pg_url, "jobreaper", "plan", "--on", worker.name, "--json")
    assert planned.returncode == EXIT_OK, planned.stdout + planned.stderr
    report = json.loads(planned.stdout)[worker.name]["report"]
    assert (report["trigger"], report["dry_run"], report["would_settle"]) == (REMOTE, True, 1)
    assert [p["job_id"] for p in report["planned"]] == ["ghost"]
    assert _statuses(engine, table) == {"ghost": "running"}, "a plan changes nothing"

    reaped = celery(broker, pg_url, "jobreaper", "reap", "--on", worker.name)
    assert reaped.returncode == EXIT_OK, reaped.stdout + reaped.stderr
    assert f"{worker.name}: settled 1 of 1 candidate job(s)" in reaped.stdout
    assert _statuses(engine, table) == {"ghost": "failed"}
    out = worker.output()
    assert "jobreaper: dry-run reap requested by " in out
    assert "jobreaper: reap requested by " in out
    r = tables.runs
    with engine.connect() as conn:
        runs = conn.execute(select(r.c.trigger, r.c.dry_run, r.c.settled).order_by(r.c.id)).all()
    seen = celery(broker, pg_url, "inspect", "jobreaper", "-d", worker.name, "--json")
    assert seen.returncode == 0, seen.stdout + seen.stderr
    info = json.loads(seen.stdout)[worker.name]
    assert info["last_run"]["trigger"] == REMOTE and info["last_run"]["settled"] == 1
    assert info["incarnation"] and info["settings"]["sources"] == ["system_jobs"]
    remote_runs = [tuple(x) for x in runs if x.trigger == REMOTE]
    assert remote_runs == [(REMOTE, True, 1), (REMOTE, False, 1)]  # (a plan counts what it would)


def test_plain_celery_control_queues_the_reap_and_replies_at_once(
    pg_url: str, engine_for: Callable[[str], Engine], start_worker: Callable[..., WorkerProcess]
) -> None:
    """``celery control jobreaper_reap dry-run``: Celery's own command line; the reply is the
    acceptance (the worker reaps in its own thread; the report is in ``inspect jobreaper``)."""
    engine = engine_for(pg_url)
    create_seed(engine, [])
    worker = _worker(start_worker, REDIS_URL, pg_url)
    done = celery(
        REDIS_URL, pg_url, "control", "jobreaper_reap", "dry-run", "-d", worker.name, "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (reply,) = json.loads(done.stdout)
    assert reply[worker.name]["ok"] == "reap requested"
    assert reply[worker.name]["dry_run"] is True
    worker.wait_for(r"dry-run reap requested by a remote-control client that did not say")

    def reported() -> Any:
        seen = celery(REDIS_URL, pg_url, "inspect", "jobreaper", "-d", worker.name, "--json")
        last = json.loads(seen.stdout)[worker.name]["last_run"] if seen.returncode == 0 else None
        return last if last and last["trigger"] == REMOTE else None

    last = wait_until(reported, 60, "the remote reap's report in inspect jobreaper")
    assert last["dry_run"] is True and last["error"] is None
    seen = celery(REDIS_URL, pg_url, "inspect", "jobreaper", "-d", worker.name, "--json")
    info = json.loads(seen.stdout)[worker.name]
    assert info["incarnation"] and info["enabled"] is True
    assert info["settings"]["interval"] == 3600 and info["settings"]["sources"] == ["system_jobs"]

    bad = celery(REDIS_URL, pg_url, "control", "jobreaper_reap", "maybe", "-d", worker.name)
    assert bad.returncode != 0 and "dry-run" in bad.stdout + bad.stderr


def test_unknown_node_and_a_worker_that_does_not_reap(
    pg_url: str, engine_for: Callable[[str], Engine], start_worker: Callable[..., WorkerProcess]
) -> None:
    engine = engine_for(pg_url)
    create_seed(engine, [])
    nobody = celery(
        REDIS_URL, pg_url, "jobreaper", "reap", "--on", "nobody@nowhere", "--timeout", "2"
    )
    assert nobody.returncode == EXIT_NO_REPORT, nobody.stdout + nobody.stderr
    assert "nobody@nowhere: no answer" in nobody.stdout

    idle = _worker(start_worker, REDIS_URL, pg_url, enabled=False)
    refused = celery(REDIS_URL, pg_url, "jobreaper", "plan", "--on", idle.name, "--timeout", "5")
    assert refused.returncode == EXIT_FAILED, refused.stdout + refused.stderr
    assert f"{idle.name}: jobreaper does not reap on this worker" in refused.stdout


def test_a_request_is_queued_while_a_reap_runs_and_reported_after_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The control command's side never waits for a reap: while another reap holds the reaper,
    the request is accepted at once; its report follows to the caller's address."""
    app = make_app(sqlite_url)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(app, settings, db)
    reaper.prepare_tables()
    remote = RemoteReaps(app, reaper, "me@here")
    remote.start()
    try:
        with reaper._lock:  # a reap in progress
            reply = remote.request(ReapRequest(dry_run=True, requester="a test"))
            assert reply["ok"] == "reap requested"
            assert reaper.last_report is None

        def ran() -> Any:
            return reaper.last_report

        report = wait_until(ran, 30, "the queued reap")
        assert report.trigger == REMOTE and report.dry_run
    finally:
        remote.stop()
        assert remote.join(10)
        db.dispose()
    assert not native.patched()
