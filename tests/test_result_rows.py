"""Celery's database result backend rows as a source, on real PostgreSQL, MariaDB and SQLite.

Every row is written by Celery's own ``DatabaseBackend`` (``store_result``, as a worker does
with ``task_track_started``); every check reads it back through ``AsyncResult``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery, states
from celery.app.task import Context
from celery.result import AsyncResult
from jobtables import ago
from sqlalchemy import MetaData, Table, inspect, select
from sqlalchemy.engine import Engine
from support import REDIS_URL, ROOT, TESTS

import celery_jobreaper
from celery_jobreaper import ConfigurationError, Settings
from celery_jobreaper.apply import settle_batch
from celery_jobreaper.clock import utcnow
from celery_jobreaper.database import Database
from celery_jobreaper.planner import Decision
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.report import Report
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.sightings import Sightings

SOURCE = "celery_taskmeta"


def result_app(url: str, **conf: Any) -> Celery:
    """An app whose result backend is the database backend in jobreaper's own database."""
    app = Celery("rr", broker=REDIS_URL, backend=f"db+{url}", set_as_current=False)
    app.conf.task_track_started = True
    app.conf.jobreaper_database_url = url
    app.conf.jobreaper_ping_timeout = 0.2
    app.conf.update(conf)
    return app


@pytest.fixture
def apps() -> Iterator[Callable[..., Celery]]:
    made: list[Celery] = []

    def make(url: str, **conf: Any) -> Celery:
        app = result_app(url, **conf)
        made.append(app)
        return app

    yield make
    for app in made:
        backend = app._backend  # (not app.backend: that would make one, and connect)
        if backend is not None:
            backend.session_manager.invalidate(backend.url)  # disposes its engine
        app.close()


def started(app: Celery, task_id: str, node: str, **extra: Any) -> None:
    """The row a worker writes when a task starts (``celery.app.trace``)."""
    app.backend.store_result(task_id, {"pid": 4242, "hostname": node}, states.STARTED, **extra)


def register(engine: Engine, node: str, heartbeat: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(
            tables.incarnations.insert().values(
                id=node.split("@", maxsplit=1)[0].ljust(32, "x")[:32],
                node=node,
                host="h",
                pid=1,
                started_at=ago(hours=1),
                heartbeat_at=heartbeat,
                state="running",
            )
        )


def events(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(tables.events).order_by(tables.events.c.id)))


def reap(
    app: Celery,
    held_by_peers: set[str] = frozenset(),  # type: ignore[assignment]
    *,
    watched: bool = True,
) -> Report:
    """One run as a process that is not a worker: no one answers a ping; live peers say they
    hold *held_by_peers*.

    *watched*: the reaper has seen every ``STARTED`` row since an hour ago, as a worker's
    reaper that has been watching the cluster has (Celery's database backend stores no start:
    a new process leaves a dead node's row whose start is unknown until it has seen it for the
    heartbeat timeout, as its node may be back from a pause; see ``planner._may_have_woken``).
    ``False``: a new process that never saw them.
    """
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    sightings = Sightings()
    if watched and inspect(db.engine).has_table(SOURCE):
        table = Table(SOURCE, MetaData(), autoload_with=db.engine)
        with db.engine.connect() as conn:
            ids = conn.execute(select(table.c.task_id).where(table.c.status == "STARTED"))
            sightings.note(SOURCE, list(ids.scalars()), ago(hours=1))
    reaper = Reaper(
        app,
        settings,
        db,
        ping=lambda nodes, timeout: set(),
        ask=lambda nodes, ids, timeout: set(held_by_peers) & set(ids),
        sightings=sightings,
    )
    try:
        return reaper.run("manual")
    finally:
        db.dispose()


def test_dead_workers_started_row_becomes_failure_through_the_backend(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))
    register(engine, "live@h", ago(seconds=1))
    started(app, "t-dead", "dead@h")
    started(app, "t-live", "live@h")
    started(app, "t-held", "dead@h")  # redelivered: a live worker holds it now
    app.backend.store_result("t-retry", ValueError("again"), states.RETRY)
    app.backend.store_result("t-done", 42, states.SUCCESS)

    report = reap(app, held_by_peers={"t-held"})

    assert report.ok and report.per_source == {SOURCE: 1}, report
    dead = AsyncResult("t-dead", app=app)
    assert dead.state == states.FAILURE
    assert isinstance(dead.result, WorkerLostError)
    message = str(dead.result)
    assert message.startswith("Worker lost: dead@h (found by jobreaper at "), message
    assert "was STARTED on dead@h" in message, message
    assert "WorkerLostError: Worker lost: dead@h" in (dead.traceback or "")
    assert dead.date_done is not None
    for task_id, node in (("t-live", "live@h"), ("t-held", "dead@h")):
        left = AsyncResult(task_id, app=app)
        assert left.state == states.STARTED
        assert left.result == {"pid": 4242, "hostname": node}
    assert AsyncResult("t-retry", app=app).state == states.RETRY
    assert AsyncResult("t-done", app=app).result == 42
    [event] = [e for e in events(engine) if e.source == SOURCE]
    assert (event.job_id, event.task_id, event.owner) == ("t-dead", "t-dead", "dead@h")
    assert (event.previous_status, event.new_status, event.action) == (
        "STARTED",
        "FAILURE",
        "settled",
    )

    again = reap(app, held_by_peers={"t-held"})
    assert again.settled == 0
    assert len([e for e in events(engine) if e.source == SOURCE]) == 1


def test_age_comes_from_the_tracked_job(
    pg_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """A node never registered that does not answer: settled once its job is older than the
    heartbeat timeout, which only the tracked row can tell (the result row has no start)."""
    engine = engine_for(pg_url)
    create_all(engine)
    app = apps(pg_url, jobreaper_heartbeat_timeout=60)
    started(app, "t-old", "ghost@h")
    started(app, "t-unknown-age", "ghost@h")
    with engine.begin() as conn:
        conn.execute(
            tables.jobs.insert().values(
                task_id="t-old",
                task_name="proj.crunch",
                status="done",
                started_at=ago(hours=2),
            )
        )

    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    try:
        [source] = [s for s in Reaper(app, settings, db).prepare() if s.name == SOURCE]
        with db.connect() as conn:
            count, oldest = source.stale_summary(conn)  # what `jobreaper status` shows
    finally:
        db.dispose()
    assert count == 2 and oldest is not None and oldest < ago(hours=1)

    report = reap(app, watched=False)  # a new process: the row of unknown age is first seen

    assert report.per_source == {SOURCE: 1}, report
    failed = AsyncResult("t-old", app=app)
    assert failed.state == states.FAILURE
    assert "was STARTED for 2:0" in str(failed.result), failed.result
    assert AsyncResult("t-unknown-age", app=app).state == states.STARTED
    [event] = [e for e in events(engine) if e.source == SOURCE]
    assert (event.job_id, event.kind) == ("t-old", "proj.crunch")


def test_a_retry_row_is_left_for_its_message_unless_past_max_age(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """A ``RETRY`` row's task lives on in its retry message, wherever that is (a queue, a
    worker's timer, a dead worker's unacked entries that the sweep restores). With no worker
    live and no message seen, failing it would revoke a retry that is still to run: it is left
    alone, and failed only once older than ``jobreaper_max_age`` (its age from the tracked
    job)."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))  # no live worker at all
    app.backend.store_result("t-retry", ValueError("again"), states.RETRY)
    app.backend.store_result("t-retry-old", ValueError("again"), states.RETRY)
    with engine.begin() as conn:
        conn.execute(
            tables.jobs.insert().values(
                task_id="t-retry-old",
                task_name="proj.crunch",
                status="retry",
                started_at=ago(hours=3),
            )
        )

    report = reap(app)
    assert report.settled == 0, report
    assert AsyncResult("t-retry", app=app).state == states.RETRY
    assert AsyncResult("t-retry-old", app=app).state == states.RETRY
    assert any("retry is pending" in reason for reason in report.left_alone), report.left_alone

    report = reap(apps(db_url, jobreaper_max_age=3600))
    assert report.per_source == {SOURCE: 1}, report
    assert AsyncResult("t-retry-old", app=app).state == states.FAILURE
    assert AsyncResult("t-retry", app=app).state == states.RETRY  # its age is unknown


def test_worker_column_of_extended_results_names_the_owner(
    pg_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    engine = engine_for(pg_url)
    create_all(engine)
    app = apps(pg_url, result_extended=True)
    register(engine, "dead@h", ago(minutes=10))
    register(engine, "live@h", ago(seconds=1))

    for task_id, node in (("t-ext", "dead@h"), ("t-ext-live", "live@h")):
        request = Context(
            hostname=node,
            task="proj.crunch",
            args=(),
            kwargs={},
            retries=0,
            delivery_info={"routing_key": "celery"},
        )
        # the stored result names no worker: only the worker column does
        app.backend.store_result(task_id, {"pid": 1}, states.STARTED, request=request)

    report = reap(app)

    assert report.per_source == {SOURCE: 1}, report
    result = AsyncResult("t-ext", app=app)
    assert result.state == states.FAILURE and isinstance(result.result, WorkerLostError)
    assert result.name == "proj.crunch" and result.worker == "dead@h"
    assert AsyncResult("t-ext-live", app=app).state == states.STARTED


@pytest.mark.parametrize(("db", "n"), [("pg_url", 300), ("mysql_url", 100), ("sqlite_url", 100)])
def test_two_concurrent_reapers_settle_each_row_once(
    db: str,
    n: int,
    request: pytest.FixtureRequest,
    engine_for: Callable[[str], Engine],
    apps: Callable[..., Celery],
) -> None:
    url = str(request.getfixturevalue(db))
    engine = engine_for(url)
    create_all(engine)
    writer = apps(url)
    register(engine, "dead@h", ago(minutes=10))
    ids = [f"t-{i:04d}" for i in range(n)]
    for task_id in ids:
        started(writer, task_id, "dead@h")
    barrier = threading.Barrier(2)
    reports: list[Report] = []
    errors: list[BaseException] = []

    def reaper() -> None:
        try:
            app = apps(url, jobreaper_batch_size=50)
            barrier.wait()
            reports.append(reap(app))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=reaper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sum(r.settled for r in reports) == n
    assert {AsyncResult(i, app=writer).state for i in ids} == {states.FAILURE}
    settled = [e.job_id for e in events(engine) if e.source == SOURCE]
    assert sorted(settled) == ids


@pytest.mark.parametrize(
    ("value", "expect"), [("auto", "auto"), (True, True), ("off", False), ("ON", True)]
)
def test_switch_values(value: Any, expect: Any) -> None:
    app = Celery("t", set_as_current=False)
    app.conf.jobreaper_database_url = "sqlite://"
    app.conf.jobreaper_result_rows = value
    assert Settings.from_app(app).result_rows == expect


def test_switch_invalid_value_names_the_key() -> None:
    app = Celery("t", set_as_current=False)
    app.conf.jobreaper_database_url = "sqlite://"
    app.conf.jobreaper_result_rows = "sometimes"
    with pytest.raises(ConfigurationError, match="jobreaper_result_rows"):
        Settings.from_app(app)


def test_switch_auto_and_off_leave_the_rows_alone(
    sqlite_url: str, tmp_path: Any, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    engine = engine_for(sqlite_url)
    create_all(engine)
    register(engine, "dead@h", ago(minutes=10))
    writer = apps(sqlite_url)
    started(writer, "t-1", "dead@h")
    # auto, task_track_started off; explicitly off; auto with the backend in another database
    other = f"sqlite:///{tmp_path / 'other.db'}"
    for app in (
        apps(sqlite_url, task_track_started=False),
        apps(sqlite_url, jobreaper_result_rows=False),
        result_app(other, jobreaper_database_url=sqlite_url),
    ):
        assert reap(app).settled == 0
    assert AsyncResult("t-1", app=writer).state == states.STARTED
    with pytest.raises(ConfigurationError, match="jobreaper_result_rows"):
        reap(result_app(other, jobreaper_database_url=sqlite_url, jobreaper_result_rows=True))
    no_backend = Celery("t", set_as_current=False)
    no_backend.conf.jobreaper_database_url = sqlite_url
    no_backend.conf.jobreaper_result_rows = True
    with pytest.raises(ConfigurationError, match="database result backend"):
        celery_jobreaper.reap(no_backend)
    assert reap(writer).settled == 1


def test_a_result_backend_that_cannot_be_set_up_does_not_stop_the_reap(
    sqlite_url: str, engine_for: Callable[[str], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    """ "auto": Celery's database backend connects when it is made; a database that cannot be
    reached there leaves the result rows for next time, and the tracked jobs are reaped."""
    engine = engine_for(sqlite_url)
    create_all(engine)
    register(engine, "dead@h", ago(minutes=10))
    with engine.begin() as conn:
        conn.execute(
            tables.jobs.insert().values(
                task_id="t-tracked",
                task_name="proj.crunch",
                status="running",
                incarnation_id="deadxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                node="dead@h",
                started_at=ago(hours=1),
            )
        )
    app = result_app("postgresql+psycopg://postgres@127.0.0.1:1/x")
    app.conf.jobreaper_database_url = sqlite_url
    caplog.set_level("WARNING", logger="celery_jobreaper")
    try:
        report = reap(app)
    finally:
        app.close()
    assert report.ok and report.per_source == {"jobreaper_jobs": 1}, report
    assert "Celery's result backend could not be set up (OperationalError" in caplog.text


def test_django_celery_results_rows_through_its_backend(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """django-celery-results in a real Django project (``tests/djangoproj``, migrations run):
    rows written by its backend, one reap, states read back through ``AsyncResult``."""
    engine = engine_for(db_url)
    create_all(engine)
    register(engine, "dead@h", ago(minutes=10))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        "DJANGO_SETTINGS_MODULE": "djangoproj.settings",
        "JR_DATABASE_URL": db_url,
        "JR_BROKER_URL": REDIS_URL,
    }
    env.pop("PYTHONWARNINGS", None)

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("django", "migrate", "--noinput")
    found = json.loads(run("djangoproj.decide").splitlines()[-1])

    assert found["per_source"] == {"django_celery_results_taskresult": 2}, found
    rows = found["rows"]
    for task_id in ("t-dead", "t-ext"):
        row = rows[task_id]
        assert row["state"] == "FAILURE", row
        assert row["type"] == "billiard.exceptions.WorkerLostError", row
        assert row["message"].startswith("Worker lost: dead@h (found by jobreaper at "), row
        assert "WorkerLostError" in row["traceback"] and row["date_done"] is not None
    assert rows["t-young"]["state"] == "STARTED"
    assert rows["t-young"]["info"] == {"pid": 1, "hostname": "ghost@h"}
    assert rows["t-done"]["state"] == "SUCCESS"
    settled = sorted(e.job_id for e in events(engine))
    assert settled == ["t-dead", "t-ext"]


def test_a_row_started_again_since_it_was_read_is_not_settled(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """The compare-and-set guards the stored result as read: a task redelivered to another
    worker in between (a new STARTED row, its hostname) is a new run, never settled."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    started(app, "t-1", "dead@h")
    started(app, "t-2", "dead@h")
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    try:
        [source] = [s for s in Reaper(app, settings, db).prepare() if s.name == SOURCE]
        with db.connect() as conn, conn.begin():
            batch = source.batch(conn, None, 10)
        assert [c.owner for c in batch] == ["dead@h", "dead@h"]
        app.backend.store_result("t-1", {"pid": 7, "hostname": "other@h"}, states.STARTED)
        decisions = [Decision(c, "fail", "on dead@h", "it was STARTED on dead@h") for c in batch]
        with db.connect() as conn, conn.begin():
            done = settle_batch(
                conn, db, tables, source.target, decisions, now=utcnow(), run_id=None
            )
    finally:
        db.dispose()
    assert [d.candidate.job_id for d in done] == ["t-2"]
    again = AsyncResult("t-1", app=app)
    assert again.state == states.STARTED and again.result == {"pid": 7, "hostname": "other@h"}
    assert AsyncResult("t-2", app=app).state == states.FAILURE
    assert [e.job_id for e in events(engine)] == ["t-2"]


def test_a_lost_workers_late_success_over_the_failure_is_recorded(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """DESIGN §2.4: the worker found dead was only paused; it wakes and Celery's backend writes
    its SUCCESS over jobreaper's FAILURE (the backend's writes cannot be fenced). The next reap
    records it: one ``late_write`` event, a warning, and ``signals.late_result``."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))
    started(app, "t-late", "dead@h")
    started(app, "t-settled", "dead@h")
    assert reap(app).settled == 2
    assert AsyncResult("t-late", app=app).state == states.FAILURE
    app.backend.store_result("t-late", 42, states.SUCCESS)  # the woken worker's late result
    heard: list[dict[str, Any]] = []

    def on_late(sender: Any, **kw: Any) -> None:
        heard.append(kw)

    celery_jobreaper.signals.late_result.connect(on_late, weak=False)
    try:
        reap(app)
        reap(app)  # recorded once
    finally:
        celery_jobreaper.signals.late_result.disconnect(on_late)
    late = [e for e in events(engine) if e.action == "late_write"]
    assert [(e.source, e.job_id, e.previous_status, e.new_status) for e in late] == [
        (SOURCE, "t-late", states.FAILURE, states.SUCCESS)
    ]
    assert "Celery" in late[0].reason
    assert [(h["task_id"], h["status"], h["node"]) for h in heard] == [
        ("t-late", states.SUCCESS, "dead@h")
    ]
