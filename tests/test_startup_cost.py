"""What a worker's startup reap sends to the database when nothing is stale (DESIGN §8: the
step's start overhead): no statement it can do without."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobtables import create_seed
from sqlalchemy import event
from sqlalchemy.engine import Engine
from support import make_app

from celery_jobreaper.database import Database
from celery_jobreaper.lease import Lease
from celery_jobreaper.liveness import Incarnation
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import tables
from celery_jobreaper.service import ReaperService
from celery_jobreaper.settings import Settings


def test_idle_startup_with_a_user_table_sends_only_what_it_needs(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    create_seed(engine_for(pg_url), [{"job_id": "done", "status": "completed"}])
    app = make_app(pg_url)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    me = Incarnation.new("cost@h")
    reaper = Reaper(app, settings, db, me=me, ping=lambda nodes, timeout: set(), held=set)
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        ReaperService(reaper, me).startup()
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
        db.dispose()
    assert reaper.last_report is not None and reaper.last_report.error is None
    # the schema version is read once (while the tables are checked), not again
    assert sum("FROM jobreaper_meta" in s for s in sent) == 1, sent
    # nothing stale: the large set-based settle statement is not built, one probe says so
    assert not any(s.startswith("WITH jr_page") for s in sent), sent
    assert sum(s.startswith("SELECT 1 FROM system_jobs") for s in sent) <= 1, sent
    # late writes are checked by the periodic reaps, not on the worker's start path
    assert not any("FROM jobreaper_events" in s for s in sent), sent


def test_the_leaders_idle_periodic_cycle_is_a_few_reads_and_writes_nothing(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Nothing stale, nothing to prune: the cluster's periodic reap reads a few rows and
    writes none (no runs row, no event), whatever the fleet (issue 9: N² -> O(1))."""
    create_seed(engine_for(pg_url), [{"job_id": "done", "status": "completed"}])
    app = make_app(pg_url)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    me = Incarnation.new("idle@h")
    lease = Lease(db, tables, holder=me.id, node=me.node, timeout=settings.lease_timeout)
    reaper = Reaper(
        app, settings, db, me=me, ping=lambda nodes, timeout: set(), held=set, fence=lease.fence
    )
    service = ReaperService(reaper, me, lease=lease)
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()))

    try:
        service.startup()
        service.beat()  # takes the lease
        assert lease.leads
        event.listen(db.engine, "before_cursor_execute", record)
        try:
            service.periodic()
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
    finally:
        db.dispose()
    writes = [s for s in sent if s.split()[0] in {"INSERT", "UPDATE", "DELETE"}]
    assert writes == [], writes
    # measured: 11 (4 clock reads, 3 lease reads -- one check, two fences --, one probe of
    # the source for stale rows, one read of live incarnations, one of the settled rows
    # whose late writes are watched, and one more probe)
    assert len(sent) <= 12, sent


def test_own_postgresql_engine_does_not_look_hstore_up(db_url: str) -> None:
    """jobreaper's own psycopg engine does not look the hstore type up on its first
    connection (no column jobreaper reads or writes is one); an explicit engine option wins.
    Other dialects get no such option (they would refuse it)."""
    db = Database.from_settings(Settings.from_app(make_app(db_url)))
    try:
        with db.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        expected = False if db.engine.dialect.name == "postgresql" else None
        assert getattr(db.engine.dialect, "use_native_hstore", None) is expected
    finally:
        db.dispose()
    if expected is None:
        return
    app = make_app(db_url)
    app.conf.jobreaper_engine_options = {"pool_pre_ping": True, "use_native_hstore": True}
    explicit = Database.from_settings(Settings.from_app(app))
    try:
        assert getattr(explicit.engine.dialect, "use_native_hstore", None) is True
    finally:
        explicit.dispose()
