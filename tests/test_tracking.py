"""The tracker's batched writer on real PostgreSQL, MariaDB and SQLite, driven directly.

Each test builds a tracker like the bootstep does (``Database.from_settings``,
``schema.create_all``, an ``Incarnation``) and calls ``started`` / ``finished`` as the task
signals would; the writer thread writes them, in one transaction per flush.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine, Row
from support import REDIS_URL, WorkerProcess, wait_until

from celery_jobreaper import signals
from celery_jobreaper.clock import utcnow
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation
from celery_jobreaper.metrics import Metrics
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.settings import Settings
from celery_jobreaper.tracking import Tracker, records
from celery_jobreaper.tracking import writer as tracking

NODE = "w1@h"
jobs, events = tables.jobs, tables.events


class Made:
    """Trackers made by a test, closed (and their engines disposed) at teardown."""

    def __init__(self) -> None:
        self.trackers: list[Tracker] = []

    def __call__(
        self, url: str, *, create: bool = True, metrics: Metrics | None = None, **conf: Any
    ) -> Tracker:
        app = Celery("t", set_as_current=False)
        app.conf.jobreaper_database_url = url
        app.conf.jobreaper_track_tasks = True
        for key, value in conf.items():
            app.conf[f"jobreaper_{key}"] = value
        settings = Settings.from_app(app)
        db = Database.from_settings(settings)
        if create:
            create_all(db.engine)
        tracker = Tracker(db, tables, settings, Incarnation.new(NODE), metrics=metrics)
        self.trackers.append(tracker)
        return tracker


@pytest.fixture
def make_tracker() -> Iterator[Made]:
    made = Made()
    yield made
    for tracker in made.trackers:
        tracker.close()
    for tracker in made.trackers:  # after all are closed: one may use another's database
        tracker.db.dispose()


@pytest.fixture
def slow_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer waits 30 s before writing: only flush() (or FLUSH_EARLY) makes it write."""
    monkeypatch.setattr(tracking, "FLUSH_INTERVAL", 30.0)


def job(tracker: Tracker, task_id: str) -> Row[Any] | None:
    with tracker.db.engine.connect() as conn:
        return conn.execute(select(jobs).where(jobs.c.task_id == task_id)).first()


def ledger(tracker: Tracker) -> list[Row[Any]]:
    with tracker.db.engine.connect() as conn:
        return list(conn.execute(select(events).order_by(events.c.id)))


@contextlib.contextmanager
def flushes(tracker: Tracker) -> Iterator[list[list[str]]]:
    """Record each flush (a call of ``Tracker._apply``) as the SQL statements it ran.

    Each flush is checked to be one transaction: one statement (autocommit), or statements
    between an explicit BEGIN and COMMIT, or (SQLite) statements ended by one commit. A flush
    that writes a running job vouches for it first, in that transaction (its UPDATEs of
    ``jobreaper_incarnations`` are left out of the flush recorded here).
    """
    done: list[list[str]] = []
    current: list[str] = []
    commits: list[int] = []
    threads: set[int] = set()
    apply = tracker._apply

    def wrapped(conn: Any, records: Any) -> Any:
        current.clear()
        commits.clear()
        threads.add(threading.get_ident())
        late = apply(conn, records)
        # a flush of a running job vouches first, in its transaction (left out here)
        current[:] = [s for s in current if not _vouch_statement(s)]
        done.append(list(current))
        statements = [s.split()[0].upper() for s in current]
        if conn.dialect.name == "sqlite":  # BEGIN IMMEDIATE … commit()
            assert statements[0] == "BEGIN" and len(commits) == 1, current
        elif len(statements) > 1:
            assert statements[0] == "BEGIN" and statements[-1] == "COMMIT", current
            assert "COMMIT" not in statements[:-1], current
        return late

    def on_execute(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        current.append(statement)

    def on_commit(conn: Any) -> None:
        commits.append(1)

    event.listen(tracker.db.engine, "before_cursor_execute", on_execute)
    event.listen(tracker.db.engine, "commit", on_commit)
    tracker._apply = wrapped  # type: ignore[method-assign]
    try:
        yield done
    finally:
        del tracker._apply
        event.remove(tracker.db.engine, "before_cursor_execute", on_execute)
        event.remove(tracker.db.engine, "commit", on_commit)
    assert threading.get_ident() not in threads, "written by the writer thread"


def _vouch_statement(statement: str) -> bool:
    """Whether *statement* is part of a tracker's vouch (an UPDATE of the incarnation, and on
    MySQL/MariaDB the isolation level of its transaction)."""
    upper = statement.upper()
    return (upper.startswith("UPDATE") and "jobreaper_incarnations" in statement) or (
        upper.startswith("SET TRANSACTION")
    )


def settle_like_a_reaper(tracker: Tracker, task_id: str) -> Row[Any]:
    """What apply does to a stale tracked job: failed, fence cleared, times_reaped + 1."""
    with tracker.db.engine.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.task_id == task_id, jobs.c.status == "running")
            .values(
                status="failed",
                fence=None,
                completed_at=utcnow(),
                error="was running on w1@h, which stopped",
                times_reaped=jobs.c.times_reaped + 1,
            )
        )
    row = job(tracker, task_id)
    assert row is not None
    return row


@pytest.mark.usefixtures("slow_writer")
def test_starts_and_finishes_are_written_together_in_one_flush(
    db_url: str, make_tracker: Made
) -> None:
    tracker = make_tracker(db_url)
    with flushes(tracker) as seen:
        tracker.started("a", "proj.add", NODE)
        tracker.started("b", "proj.div", None)
        tracker.started("c", "proj.long", NODE)
        tracker.finished("a", "SUCCESS")
        tracker.finished("b", "FAILURE", "ZeroDivisionError: division by zero")
        assert job(tracker, "a") is None, "nothing is written before the flush"
        assert tracker.pending() == 5
        assert tracker.flush(timeout=30)
    assert len(seen) == 1, "one transaction for the whole flush"
    assert tracker.pending() == 0

    a, b, c = job(tracker, "a"), job(tracker, "b"), job(tracker, "c")
    assert a is not None and b is not None and c is not None
    assert (a.status, a.fence, a.error, a.node, a.times_reaped) == (
        "succeeded",
        None,
        None,
        NODE,
        0,
    )
    assert a.incarnation_id == tracker.me.id and a.task_name == "proj.add"
    assert a.started_at is not None and a.completed_at is not None
    assert a.completed_at >= a.started_at
    assert (b.status, b.error, b.fence) == ("failed", "ZeroDivisionError: division by zero", None)
    assert b.node == NODE  # the incarnation's node when the request has none
    assert (c.status, c.completed_at) == ("running", None)
    assert c.fence is not None and c.fence == tracker._fences["c"]

    with flushes(tracker) as seen:  # the finish of an earlier flush's start: fenced CAS
        tracker.finished("c", "SUCCESS")
        assert tracker.flush(timeout=30)
    assert len(seen) == 1
    c = job(tracker, "c")
    assert c is not None and (c.status, c.fence) == ("succeeded", None)
    assert ledger(tracker) == []


def test_writer_flushes_on_its_own_within_the_interval(db_url: str, make_tracker: Made) -> None:
    tracker = make_tracker(db_url)
    tracker.started("a", "proj.add", NODE)
    tracker.finished("a", "SUCCESS")
    wait_until(
        lambda: (row := job(tracker, "a")) is not None and row.status == "succeeded",
        10,
        "the writer thread to write",
    )
    assert tracker.pending() == 0


@pytest.mark.usefixtures("slow_writer")
def test_redelivery_of_a_known_task_id_resets_its_row(db_url: str, make_tracker: Made) -> None:
    first = make_tracker(db_url)
    first.started("t", "proj.job", NODE)
    assert first.flush(timeout=30)
    settled = settle_like_a_reaper(first, "t")
    assert (settled.status, settled.times_reaped) == ("failed", 1)

    # The message is delivered again (to a new incarnation): the row starts over.
    second = make_tracker(db_url, create=False)
    second.started("t", "proj.job", "w2@h")
    assert second.flush(timeout=30)
    row = job(second, "t")
    assert row is not None
    assert (row.status, row.node, row.incarnation_id) == ("running", "w2@h", second.me.id)
    assert (row.completed_at, row.error, row.times_reaped) == (None, None, 1)
    assert row.fence == second._fences["t"] != settled.fence

    # A retry in the same flush as the first run: start, retry, start, success, in order.
    second.finished("t", "RETRY")
    second.started("t", "proj.job", "w2@h")
    second.finished("t", "SUCCESS")
    second.started("u", "proj.job", "w2@h")
    second.finished("u", "RETRY")
    second.started("u", "proj.job", "w2@h")
    with flushes(second) as seen:
        assert second.flush(timeout=30)
    assert len(seen) == 1
    row = job(second, "t")
    assert row is not None and (row.status, row.fence, row.times_reaped) == ("succeeded", None, 1)
    u = job(second, "u")
    assert u is not None and (u.status, u.fence) == ("running", second._fences["u"])
    assert ledger(second) == [], "a retry is no late result"


@pytest.mark.usefixtures("slow_writer")
def test_finish_after_the_reaper_settled_the_job_is_a_late_result(
    db_url: str, make_tracker: Made, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    tracker = make_tracker(db_url, metrics=Metrics(registry))
    tracker.started("late", "proj.job", NODE)
    tracker.started("fine", "proj.job", NODE)
    assert tracker.flush(timeout=30)
    settled = settle_like_a_reaper(tracker, "late")
    received: list[dict[str, Any]] = []

    def on_late(sender: Any = None, **kwargs: Any) -> None:
        received.append({**kwargs, "thread": threading.get_ident()})

    signals.late_result.connect(on_late, weak=False)
    try:
        with caplog.at_level(logging.WARNING, logger="celery_jobreaper"):
            tracker.finished("late", "SUCCESS")
            tracker.finished("fine", "SUCCESS")  # same flush, applied normally
            assert tracker.flush(timeout=30)
    finally:
        signals.late_result.disconnect(on_late)

    assert job(tracker, "late") == settled, "the settled row is kept as the reaper wrote it"
    fine = job(tracker, "fine")
    assert fine is not None and fine.status == "succeeded"
    [late] = ledger(tracker)
    assert (late.action, late.task_id, late.job_id, late.source) == (
        "late_result",
        "late",
        "late",
        "jobreaper_jobs",
    )
    assert (late.previous_status, late.new_status, late.owner) == ("running", "succeeded", NODE)
    assert late.run_id is None and "late result 'succeeded'" in late.reason
    warnings = [r.getMessage() for r in caplog.records if "late result for task" in r.getMessage()]
    assert warnings == [
        f"jobreaper: late result for task late: {NODE} finished it as succeeded after it had "
        "been settled; the settled row was kept and the late result recorded in the ledger"
    ]
    assert [(r["task_id"], r["status"], r["node"]) for r in received] == [
        ("late", "succeeded", NODE)
    ]
    assert [(r["source"], r["job_id"]) for r in received] == [("jobreaper_jobs", "late")]
    late_total = registry.get_sample_value(
        "jobreaper_late_results_total", {"source": "jobreaper_jobs"}
    )
    assert late_total == 1


def test_flush_on_demand(db_url: str, make_tracker: Made, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = make_tracker(db_url)
    assert tracker.flush(timeout=5), "nothing queued: nothing to wait for"
    monkeypatch.setattr(tracking, "FLUSH_INTERVAL", 30.0)
    tracker.started("a", "proj.add", NODE)
    threading.Event().wait(0.2)
    assert job(tracker, "a") is None and tracker.pending() == 1
    assert tracker.flush(timeout=30)
    row = job(tracker, "a")
    assert row is not None and row.status == "running"
    # What the worker's shutdown paths call.
    tracker.finished("a", "SUCCESS")
    tracker.flush_before_exit("the test ends")
    row = job(tracker, "a")
    assert row is not None and row.status == "succeeded"


def test_many_pending_records_are_written_early_in_batches(
    db_url: str, make_tracker: Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracking, "FLUSH_INTERVAL", 30.0)
    monkeypatch.setattr(tracking, "MAX_BATCH", 150)
    tracker = make_tracker(db_url)
    for i in range(tracking.FLUSH_EARLY):  # FLUSH_EARLY records wake the writer at once
        tracker.started(f"t{i:04d}", "proj.job", NODE)
    for _ in range(1000):
        if tracker.pending() == 0:
            break
        threading.Event().wait(0.01)
    assert tracker.pending() == 0
    for i in range(tracking.FLUSH_EARLY):
        tracker.finished(f"t{i:04d}", "SUCCESS")
    for i in range(400):
        tracker.started(f"u{i:04d}", "proj.job", NODE)
        tracker.finished(f"u{i:04d}", "SUCCESS")
    assert tracker.flush(timeout=60)
    with tracker.db.engine.connect() as conn:
        statuses = conn.execute(select(jobs.c.status)).scalars().all()
    assert len(statuses) == 500 and set(statuses) == {"succeeded"}


def test_gevent_or_eventlet_writes_at_once_without_a_writer(
    db_url: str, make_tracker: Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracking, "_greened", lambda: True)
    tracker = make_tracker(db_url)
    tracker.started("a", "proj.add", NODE)
    row = job(tracker, "a")
    assert row is not None and (row.status, row.fence) == ("running", tracker._fences["a"])
    settle_like_a_reaper(tracker, "a")
    tracker.started("b", "proj.add", NODE)
    tracker.finished("b", "SUCCESS")
    tracker.finished("a", "SUCCESS")  # late
    assert tracker._writer is None and tracker.pending() == 0
    a, b = job(tracker, "a"), job(tracker, "b")
    assert a is not None and a.status == "failed"
    assert b is not None and b.status == "succeeded"
    assert [(e.task_id, e.action) for e in ledger(tracker)] == [("a", "late_result")]


def _unreachable(db_url: str, tmp_path: Path) -> str:
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'no-such-dir' / 'jobs.db'}"
    if db_url.startswith("mysql"):
        return "mysql+pymysql://root@127.0.0.1:1/x"
    return "postgresql+psycopg://postgres@127.0.0.1:1/x"


def test_unreachable_database_keeps_a_bounded_queue_and_catches_up(
    db_url: str,
    tmp_path: Path,
    make_tracker: Made,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tracking, "MAX_PENDING", 50)
    monkeypatch.setattr(tracking, "RETRY_FIRST", 0.05)
    good = make_tracker(db_url)  # makes the tables
    tracker = make_tracker(_unreachable(db_url, tmp_path), create=False, connect_timeout=1)
    with caplog.at_level(logging.WARNING, logger="celery_jobreaper"):
        for i in range(100):  # 200 records: the oldest 150 are dropped
            tracker.started(f"t{i:03d}", "proj.job", NODE)  # never raises
            tracker.finished(f"t{i:03d}", "SUCCESS")
            assert tracker.pending() <= 50 + tracker._inflight <= 100  # (+ a batch in flight)
        assert not tracker.flush(timeout=30), "the database is down: flush reports it"
        assert tracker.pending() == 50
        assert tracker._writer is not None and tracker._writer.is_alive()
        threading.Event().wait(0.3)  # a few more failed retries: still one line each
        messages = [r.getMessage() for r in caplog.records]
    failures = [m for m in messages if "could not write" in m]
    overflows = [m for m in messages if "dropping the oldest" in m]
    assert len(failures) == 1 and len(overflows) == 1, messages
    assert all(m.startswith("jobreaper: ") for m in messages)
    assert not any(r.exc_info for r in caplog.records), "no traceback for a database outage"

    # The database is back (here: the tracker is pointed at the real one): the kept records go
    # in, and a finish whose start was dropped is no late result.
    down = tracker.db
    tracker.db = good.db
    with caplog.at_level(logging.WARNING, logger="celery_jobreaper"):
        # (an attempt already under way on the old address may fail first)
        wait_until(lambda: tracker.flush(timeout=5), 30, "the kept records to be written")
    down.dispose()
    with good.db.engine.connect() as conn:
        rows = conn.execute(select(jobs.c.task_id, jobs.c.status).order_by(jobs.c.task_id)).all()
    assert rows == [(f"t{i:03d}", "succeeded") for i in range(75, 100)]
    assert ledger(good) == []
    assert any("work again after" in r.getMessage() for r in caplog.records)


def test_forked_child_writes_its_own_records_only(
    db_url: str, make_tracker: Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool process is forked from the main process: its writer thread is its own."""
    monkeypatch.setattr(tracking, "FLUSH_INTERVAL", 30.0)
    tracker = make_tracker(db_url)
    tracker.started("parent", "proj.job", NODE)
    assert tracker.flush(timeout=30)  # the parent's writer thread runs ...
    tracker.finished("parent", "SUCCESS")  # ... and holds a pending record at the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no inherited queue; a writer of its own
        code = 1
        try:
            os.close(read)
            assert tracker.pending() == 0
            tracker.started("child", "proj.job", "child@h")
            tracker.finished("child", "SUCCESS")
            code = 0 if tracker.flush(timeout=30) and tracker.pending() == 0 else 2
        finally:
            os.write(write, str(code).encode())
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        assert pipe.read() == "0"
    os.waitpid(pid, 0)
    child = job(tracker, "child")
    assert child is not None and (child.status, child.node) == ("succeeded", "child@h")
    parent = job(tracker, "parent")
    assert parent is not None and parent.status == "running", "not written by the child"
    assert tracker.pending() == 1
    assert tracker.flush(timeout=30)
    parent = job(tracker, "parent")
    assert parent is not None and parent.status == "succeeded"


def test_rounds_keep_each_tasks_records_in_order() -> None:
    now = utcnow()

    def start(task_id: str, fence: str) -> records._Start:
        return records._Start(task_id, "n", NODE, "inc", now, fence)

    def finish(task_id: str, fence: str, status: str = "succeeded") -> records._Finish:
        return records._Finish(task_id, fence, status, now, None)

    rounds = records._rounds(
        [
            finish("old", "f0"),  # started in an earlier flush
            start("old", "f1"),  # redelivered: after its finish
            start("a", "f2"),
            finish("a", "f2"),  # merged into its start
            start("a", "f3"),  # a retry: a new round
            finish("a", "f3", "retry"),
        ]
    )
    assert [sorted(s) for s, _ in rounds] == [["a"], ["a", "old"]]
    assert [[f.task_id for f in fs] for _, fs in rounds] == [["old"], []]
    assert rounds[0][0]["a"]["status"] == "succeeded" and rounds[0][0]["a"]["fence"] is None
    assert rounds[1][0]["a"]["status"] == "retry" and rounds[1][0]["old"]["status"] == "running"


SLOW_FLUSH_APP = """
import celery_jobreaper.tracking.writer as tracking

tracking.FLUSH_INTERVAL = 30.0  # records wait for a shutdown flush (or FLUSH_EARLY of them)

from workerapp import app  # noqa: E402
"""


@pytest.mark.slow
@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("solo", 1), ("threads", 4)])
def test_warm_shutdown_writes_what_the_writer_still_holds(
    pool: str,
    concurrency: int,
    pg_url: str,
    unique: str,
    tmp_path: Path,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Real workers of each pool: records still queued at a warm shutdown are written."""
    (tmp_path / "slowflush.py").write_text(SLOW_FLUSH_APP)
    queue = f"q-{unique}"
    env = {
        "JR_BROKER_URL": REDIS_URL,
        "JR_DATABASE_URL": pg_url,
        "JR_QUEUE": queue,
        "JR_SETTINGS": json.dumps({}),
    }
    worker = start_worker(
        f"{pool}-{unique}@h", env=env, pool=pool, concurrency=concurrency, app="slowflush"
    )
    worker.wait_for(r" ready\.")
    sender = Celery("sender", broker=REDIS_URL, set_as_current=False)
    try:
        ids = [
            sender.send_task("jr.sleep", args=(0,), kwargs={"tag": f"t{i}"}, queue=queue).id
            for i in range(20)
        ]
    finally:
        sender.close()
    wait_until(
        lambda: all((tmp_path / f"finished-t{i}").exists() for i in range(20)), 60, "the tasks"
    )
    worker.wait_for(r"Task jr\.sleep\[[^\]]+\] succeeded", count=20)
    engine = engine_for(pg_url)

    def statuses() -> dict[str, str]:
        with engine.connect() as conn:
            return dict(conn.execute(select(jobs.c.task_id, jobs.c.status)).all())

    assert statuses() == {}, "the records wait in the writer (30 s interval)"
    assert worker.stop() == 0
    assert statuses() == dict.fromkeys(ids, "succeeded")
    assert "could not be written" not in worker.output()


def test_pool_process_loss_settles_the_tracked_job_with_its_ledger_event(
    db_url: str, make_tracker: Made
) -> None:
    """``lost`` (the main process's failure signal: WorkerLostError, TimeLimitExceeded) fails
    the job and writes its ledger event in one transaction, once (DESIGN §2.3, §2.5)."""
    tracker = make_tracker(db_url)
    tracker.started("t-oom", "jr.job", None)
    tracker.flush(10)
    why = "WorkerLostError: Worker exited prematurely: signal 9 (SIGKILL)"
    tracker.lost("t-oom", why)
    tracker.lost("t-oom", why)  # said twice: changes nothing the second time
    with tracker.db.engine.connect() as conn:
        status = conn.execute(
            select(tables.jobs.c.status).where(tables.jobs.c.task_id == "t-oom")
        ).scalar_one()
        events = conn.execute(select(tables.events)).all()
    assert status == "failed"
    assert [(e.action, e.job_id, e.task_id, e.kind, e.new_status, e.reason) for e in events] == [
        ("settled", "t-oom", "t-oom", "jr.job", "failed", why)
    ]


def test_records_dropped_while_a_batch_is_in_flight_are_the_oldest(
    sqlite_url: str, tmp_path: Path, make_tracker: Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is down and the writer's attempt is slow (a connect timeout): the records
    queued meanwhile are newer than the batch in flight; when the attempt fails, the oldest
    are dropped — that batch — not the newest."""
    monkeypatch.setattr(tracking, "MAX_PENDING", 50)
    monkeypatch.setattr(tracking, "RETRY_FIRST", 0.05)
    good = make_tracker(sqlite_url)
    tracker = make_tracker(_unreachable(sqlite_url, tmp_path), create=False)
    entered, release = threading.Event(), threading.Event()
    write_once = tracker._write_once

    def slow(records: Any) -> Any:
        entered.set()
        release.wait(30)
        return write_once(records)

    monkeypatch.setattr(tracker, "_write_once", slow)
    for i in range(10):
        tracker.started(f"t{i:03d}", "proj.job", NODE)
        tracker.finished(f"t{i:03d}", "SUCCESS")
    assert not tracker.flush(timeout=0.01)  # the writer takes these 20 records, and waits
    assert entered.wait(10)
    for i in range(10, 100):
        tracker.started(f"t{i:03d}", "proj.job", NODE)
        tracker.finished(f"t{i:03d}", "SUCCESS")
    release.set()  # the slow attempt fails: its batch goes back to the head, then is dropped
    wait_until(lambda: tracker._failures > 0, 10, "the slow attempt to fail")
    tracker.db = good.db
    wait_until(lambda: tracker.flush(timeout=5), 30, "the kept records to be written")
    with good.db.engine.connect() as conn:
        rows = conn.execute(select(jobs.c.task_id).order_by(jobs.c.task_id)).scalars().all()
    assert rows == [f"t{i:03d}" for i in range(75, 100)]
