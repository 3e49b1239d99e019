"""Adversarial review of first sightings, the tracker's vouch and late writes to result rows
(DESIGN §2.1, §2.4 and the liveness bound). Each test states the property it expects; each
failed on the code it was written against. Two are known limits, kept as strict xfails."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import test_result_rows
from jobtables import SEED_SOURCE, ago, seed_table
from sqlalchemy import MetaData, Table, insert, select, update
from sqlalchemy.engine import Engine
from support import make_app

from celery_jobreaper import Settings, bulk
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation, Liveness
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import tables

apps = test_result_rows.apps  # the fixture

TIMEOUT = 1.0
SHORT = {"heartbeat_interval": 0.5, "heartbeat_timeout": TIMEOUT, "grace": 0}


def _register(engine: Engine, inc: Incarnation, *, seconds_ago: float = 0.0) -> None:
    t = tables.incarnations
    with engine.begin() as conn:
        Liveness(tables, heartbeat_timeout=TIMEOUT).register(conn, inc)
        if seconds_ago:
            past = ago(seconds=seconds_ago)
            conn.execute(
                update(t).where(t.c.id == inc.id).values(started_at=past, heartbeat_at=past)
            )


def _status(engine: Engine, table: Table) -> tuple[str, str | None]:
    with engine.connect() as conn:
        row = conn.execute(select(table.c.status, table.c.error)).one()
    return row.status, row.error


def test_own_node_row_with_unknown_start_of_an_earlier_start_is_never_settled(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """A worker restarted under the same node name (the usual ``celery@host``): its earlier
    start left a running row naming the node with ``started_at`` NULL. The new start is the
    only worker (so also the leader); it holds no task. Its own earlier start is dead at once
    (DESIGN §2.2), yet the row is left "owned by this node name, start time unknown" on every
    run, however long it waits; any other reaper sees the node live. Stuck forever."""
    engine = engine_for(db_url)
    table = seed_table(MetaData(), owner=True)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table).values(
                job_id="j1", job_type="x", status="running", started_at=None, owner="w@h"
            )
        )
    me = Incarnation.new("w@h")
    app = make_app(db_url, sources=[{**SEED_SOURCE, "owner": "owner"}], **SHORT)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(
        app,
        settings,
        db,
        me=me,
        held=set,
        ping=lambda nodes, t: set(),
        ask=lambda n, ids, t: set(),
    )
    reaper.prepare_tables()
    _register(engine, Incarnation.new("w@h"), seconds_ago=10 * TIMEOUT)  # the earlier start
    _register(engine, me)
    reports = []
    try:
        reports.append(reaper.run("startup"))
        for _ in range(2):
            time.sleep(TIMEOUT + 0.3)
            with engine.begin() as conn:  # this worker keeps heartbeating
                Liveness(tables, heartbeat_timeout=TIMEOUT).heartbeat(conn, me)
            reports.append(reaper.run("periodic"))
    finally:
        db.dispose()
    status, _ = _status(engine, table)
    assert status == "failed", [r.left_alone for r in reports]


@pytest.mark.parametrize("path", ["python", "bulk"])
def test_start_unknown_settled_within_timeout_of_the_last_workers_death(
    pg_url: str, engine_for: Callable[[str], Engine], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-running reaper has watched a job without owner (start unknown) while another
    worker was live. That worker dies; once its silence is older than the timeout the job
    should be failed (bound: heartbeat_timeout + interval after the death). The Python path
    notes sightings in every run; the set-based path (bulk.py) notes them only in runs that
    find no live worker, so there the job waits another whole timeout after the verdict."""
    monkeypatch.setattr(bulk, "ENABLED", path == "bulk")
    engine = engine_for(pg_url)
    table = seed_table(MetaData())
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table).values(job_id="j1", job_type="x", status="scheduled", started_at=None)
        )
    replies: set[str] = {"other@h"}
    app = make_app(pg_url, sources=[SEED_SOURCE], **SHORT)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(
        app, settings, db, ping=lambda nodes, t: set(replies), ask=lambda n, ids, t: set()
    )
    reaper.prepare_tables()
    try:
        live = reaper.run("manual")  # the other worker answers: nothing failed
        assert _status(engine, table)[0] == "scheduled", live
        replies.clear()  # it dies right after
        time.sleep(TIMEOUT + 0.5)
        dead = reaper.run("manual")  # its silence is now older than the timeout
    finally:
        db.dispose()
    assert _status(engine, table)[0] == "failed", (path, dead.left_alone)


@pytest.mark.xfail(
    strict=True,
    reason="known limit (README, 'From any other process'): first sightings live in a worker's "
    "reaper; a one-shot process never saw a row whose start is unknown and leaves it to a "
    "worker's periodic reap",
)
def test_one_shot_reaps_never_settle_a_dead_nodes_started_result_row(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Any]
) -> None:
    """README: "From any other process — a web app's startup, a cron job: reap(app)". A
    deployment that reaps from a cron job (each run a new process: no sightings) never settles
    a STARTED row of Celery's own backend (no start stored) whose node died long ago, however
    many runs pass: every run sees it for the first time (``planner._may_have_woken`` with no
    first sighting: "appeared now")."""
    from celery import states
    from celery.result import AsyncResult
    from test_result_rows import reap as one_shot
    from test_result_rows import register, started

    from celery_jobreaper.schema import create_all

    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url, jobreaper_heartbeat_interval=0.5, jobreaper_heartbeat_timeout=TIMEOUT)
    register(engine, "dead@h", ago(minutes=10))
    started(app, "t-dead", "dead@h")
    reports = []
    for _ in range(3):
        reports.append(one_shot(app, watched=False))
        time.sleep(TIMEOUT + 0.3)
    assert AsyncResult("t-dead", app=app).state == states.FAILURE, [r.left_alone for r in reports]


def test_lost_owners_late_retry_over_the_failure_is_recorded(
    pg_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Any]
) -> None:
    """DESIGN §2.4. With ``result_extended`` the worker column tells runs apart: the lost node
    itself, woken, stores RETRY (its task called ``self.retry()``) over jobreaper's FAILURE.
    That is the settled run's late outcome, written by its old owner, yet it is not recorded
    (``is_late_write``: non-ready states are "a run under way")."""
    from celery import states
    from celery.app.task import Context
    from celery.result import AsyncResult
    from test_result_rows import SOURCE, events, register
    from test_result_rows import reap as watched_reap

    from celery_jobreaper.schema import create_all

    engine = engine_for(pg_url)
    create_all(engine)
    app = apps(pg_url, result_extended=True)
    register(engine, "dead@h", ago(minutes=10))
    request = Context(
        hostname="dead@h",
        task="proj.crunch",
        args=(),
        kwargs={},
        retries=0,
        delivery_info={"routing_key": "celery"},
    )
    app.backend.store_result("t-late", {"pid": 1}, states.STARTED, request=request)
    assert watched_reap(app).settled == 1
    assert AsyncResult("t-late", app=app).state == states.FAILURE
    # the woken owner's own late write: the attempt raised Retry
    app.backend.store_result("t-late", ValueError("again"), states.RETRY, request=request)
    watched_reap(app)
    late = [e for e in events(engine) if e.action == "late_write" and e.source == SOURCE]
    assert [(e.job_id, e.new_status) for e in late] == [("t-late", states.RETRY)]


def test_never_registered_owners_row_with_unknown_start_is_never_settled(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """A row naming a node that never registered and does not answer is failed once older
    than the timeout (``unregistered_silent``); with ``started_at`` NULL it is left "owner
    unknown ... (set jobreaper_max_age)" forever, by a long-running reaper too, and max_age
    cannot help (a start unknown is never older than max_age). Sightings could age it."""
    engine = engine_for(sqlite_url)
    table = seed_table(MetaData(), owner=True)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table).values(
                job_id="j1", job_type="x", status="running", started_at=None, owner="ghost@h"
            )
        )
    app = make_app(
        sqlite_url, sources=[{**SEED_SOURCE, "owner": "owner"}], max_age=TIMEOUT, **SHORT
    )
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(app, settings, db, ping=lambda nodes, t: set(), ask=lambda n, ids, t: set())
    reaper.prepare_tables()
    reports = []
    try:
        for _ in range(3):
            reports.append(reaper.run("manual"))
            time.sleep(TIMEOUT + 0.3)
    finally:
        db.dispose()
    assert _status(engine, table)[0] == "failed", [r.left_alone for r in reports]


@pytest.mark.parametrize(
    "writer",
    [
        "same",
        pytest.param(
            "longer",
            marks=pytest.mark.xfail(
                strict=True,
                reason="known limit (README): every process of a cluster must use the same "
                "heartbeat settings; raise the timeout first, lower it last",
            ),
        ),
    ],
)
def test_vouch_threshold_of_a_worker_with_longer_settings_than_the_reapers(
    db_url: str, engine_for: Callable[[str], Engine], writer: str
) -> None:
    """The vouch renews a heartbeat older than min(1.5 interval, timeout/2) of the WRITER's
    settings; a reaper judges with its own timeout. During a rolling change of
    ``jobreaper_heartbeat_timeout`` (90 s -> 40 s), or a one-shot reaper configured apart, a
    worker paused 43 s (heartbeat older than the reaper's 40 s, younger than its own vouch
    threshold of 45 s) is judged dead by a reap; it wakes and starts a tracked job before its
    heartbeat thread runs; its vouch renews nothing, so the reap that judged it before settles
    the new job of a live worker (DESIGN §2.1). ("same": the control, one configuration.)"""
    from test_woken_owner import _tracked_status

    from celery_jobreaper.tracking import Tracker

    engine = engine_for(db_url)
    app = make_app(
        db_url, track_tasks=True, sources=[], heartbeat_interval=10, heartbeat_timeout=40
    )
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(app, settings, db, ping=lambda nodes, t: set(), ask=lambda n, ids, t: set())
    reaper.prepare_tables()
    woken = Incarnation.new("woken@h")
    _register(engine, woken, seconds_ago=43)
    writer_settings = (
        settings
        if writer == "same"
        else Settings.from_app(
            make_app(
                db_url, track_tasks=True, sources=[], heartbeat_interval=30, heartbeat_timeout=90
            )
        )
    )
    try:
        view = reaper.assess()
        assert woken.id in view.dead_incarnations
        tracker = Tracker(db, tables, writer_settings, woken)
        try:
            tracker.started("t-new", "proj.long", woken.node)
            assert tracker.flush(timeout=30)
        finally:
            tracker.close()
        report = reaper.run("manual", view=view)
    finally:
        db.dispose()
    assert _tracked_status(engine, "t-new") == "running", report


def test_set_based_path_binds_every_sighting_into_every_page(
    pg_url: str, engine_for: Callable[[str], Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cost (liveness of the periodic reap): each page of the set-based path binds ALL of the
    source's sightings seen long enough (``seen_before``), not the page's: a run that fails N
    rows whose start is unknown in pages of ``batch_size`` sends about N*N/batch_size ids (the
    seed's ``scheduled`` jobs after a crash: 1 000 000 rows, pages of 1000, are 10^9 array
    elements in one run), and copies the whole store for every page. Expect it linear."""
    monkeypatch.setattr(bulk, "ENABLED", True)
    engine = engine_for(pg_url)
    table = seed_table(MetaData())
    table.create(engine)
    n, page = 2000, 100
    with engine.begin() as conn:
        conn.execute(
            insert(table),
            [
                {"job_id": f"j{i:05d}", "job_type": "x", "status": "scheduled", "started_at": None}
                for i in range(n)
            ],
        )
    app = make_app(pg_url, sources=[SEED_SOURCE], batch_size=page, **SHORT)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(app, settings, db, ping=lambda nodes, t: set(), ask=lambda n, ids, t: set())
    reaper.prepare_tables()
    bound: list[int] = []
    real = bulk.BulkSettler.batch

    def spy(self: Any, conn: Any, after: Any, **kw: Any) -> Any:
        bound.append(len(kw.get("seen_before", ())))
        return real(self, conn, after, **kw)

    try:
        reaper.run("manual")  # notes them all
        time.sleep(TIMEOUT + 0.3)
        monkeypatch.setattr(bulk.BulkSettler, "batch", spy)
        report = reaper.run("manual")
    finally:
        db.dispose()
    assert report.settled == n
    assert sum(bound) <= 2 * n, (len(bound), sum(bound))


@pytest.mark.parametrize("url_fixture", ["pg_url", "mysql_url"])
def test_vouch_racing_mark_dead_leaves_a_fresh_heartbeat_marked_dead(
    url_fixture: str, engine_for: Callable[[str], Engine], request: pytest.FixtureRequest
) -> None:
    """The vouch is two statements: (1) ``state = dead`` -> heartbeat and RUNNING, else (2)
    heartbeat older than the threshold -> heartbeat only. A reaper's ``mark_dead`` committed
    between them (READ COMMITTED: each statement reads what was committed) makes (1) miss and
    (2) renew the heartbeat of a row now ``dead``: the incarnation stays ``dead`` with a fresh
    heartbeat, the revival warning is not logged, and ``newcomers()`` / the liveness query for
    jobs without owner (both read only running/draining rows) do not see this live worker
    until its next regular heartbeat."""
    from sqlalchemy import event

    from celery_jobreaper.liveness import mark_dead, newcomers
    from celery_jobreaper.tracking import Tracker
    from celery_jobreaper.vocabulary import DEAD

    url = request.getfixturevalue(url_fixture)
    engine = engine_for(url)
    app = make_app(url, track_tasks=True, sources=[], **SHORT)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(app, settings, db, ping=lambda nodes, t: set(), ask=lambda n, ids, t: set())
    reaper.prepare_tables()
    woken = Incarnation.new("woken@h")
    _register(engine, woken, seconds_ago=3 * TIMEOUT)
    view = reaper.assess()
    assert woken.id in view.dead_heartbeats
    fired: list[bool] = []

    def between(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = " ".join(statement.split()).lower()
        if fired or not text.startswith("update jobreaper_incarnations set heartbeat_at"):
            return
        if "state" not in text.split(" where ")[0]:
            return
        fired.append(True)  # after the vouch's first statement: a reaper marks W dead
        with engine.begin() as other:
            mark_dead(other, tables, view, skip_locked=True)

    event.listen(db.engine, "after_cursor_execute", between)
    try:
        tracker = Tracker(db, tables, settings, woken)
        try:
            tracker.started("t-new", "proj.long", woken.node)
            assert tracker.flush(timeout=30)
        finally:
            tracker.close()
    finally:
        event.remove(db.engine, "after_cursor_execute", between)
    t = tables.incarnations
    try:
        with engine.connect() as conn:
            state, beat = conn.execute(
                select(t.c.state, t.c.heartbeat_at).where(t.c.id == woken.id)
            ).one()
            came = newcomers(conn, tables, view)
    finally:
        db.dispose()
    assert fired
    assert beat != view.dead_heartbeats[woken.id]  # the vouch renewed the heartbeat ...
    assert state != DEAD and came, (state, came)  # ... of a row left dead
