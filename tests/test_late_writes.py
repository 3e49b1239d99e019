"""Late writes to user tables (DESIGN §2.4): the application's own UPDATE of a row jobreaper
settled cannot be blocked, but it is detected by the next reap, recorded in the ledger once
(whatever number of reapers run), logged and signalled, and not again on later reaps."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from jobtables import create_seed
from sqlalchemy import Table, func, inspect, select, update
from sqlalchemy.engine import Engine, Row
from support import make_app

import celery_jobreaper
from celery_jobreaper import late_writes, signals
from celery_jobreaper.report import Report
from celery_jobreaper.schema import create_all, tables

OVERWRITTEN = 40  # rows the application completes after jobreaper failed them


def late_events(engine: Engine) -> list[Row[Any]]:
    ev = tables.events
    with engine.connect() as conn:
        return list(
            conn.execute(select(ev).where(ev.c.action == "late_write").order_by(ev.c.job_id))
        )


def settle_then_overwrite(engine: Engine, url: str) -> Table:
    """Jobs left running, settled by a reap, then some completed by a late application write."""
    table = create_seed(engine, [{"job_id": f"j{i:03d}"} for i in range(2 * OVERWRITTEN)])
    assert celery_jobreaper.reap(make_app(url)).settled == 2 * OVERWRITTEN
    with engine.begin() as conn:  # the paused worker wakes up: its own completion UPDATE
        conn.execute(
            update(table)
            .where(table.c.job_id < f"j{OVERWRITTEN:03d}")
            .values(status="completed", error=None)
        )
    return table


def test_two_concurrent_reapers_record_each_late_write_once(
    db_url: str,
    engine_for: Callable[[str], Engine],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = engine_for(db_url)
    table = settle_then_overwrite(engine, db_url)
    if engine.dialect.name != "sqlite":  # (SQLite: BEGIN IMMEDIATE lets one in at a time)
        # Both reapers have read the same unrecorded settlements before either records one.
        both_read = threading.Barrier(2, timeout=30)
        check = late_writes._check_source

        def check_together(*args: Any, **kwargs: Any) -> Any:
            both_read.wait()
            return check(*args, **kwargs)

        monkeypatch.setattr(late_writes, "_check_source", check_together)
    barrier = threading.Barrier(2)
    reports: list[Report] = []
    errors: list[BaseException] = []
    signalled: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_late(sender: Any = None, **kwargs: Any) -> None:
        with lock:
            signalled.append(kwargs)

    def reaper() -> None:
        try:
            barrier.wait()
            reports.append(celery_jobreaper.reap(make_app(db_url)))
        except BaseException as error:
            errors.append(error)

    signals.late_result.connect(on_late, weak=False, dispatch_uid="test-late-writes")
    caplog.set_level(logging.WARNING, logger="celery_jobreaper")
    try:
        threads = [threading.Thread(target=reaper) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        monkeypatch.undo()
        assert not errors, errors
        assert [r.settled for r in reports] == [0, 0]
        # Later reaps find the same rows still overwritten: nothing new to record.
        celery_jobreaper.reap(make_app(db_url))
    finally:
        signals.late_result.disconnect(dispatch_uid="test-late-writes")

    events = late_events(engine)
    assert [e.job_id for e in events] == [f"j{i:03d}" for i in range(OVERWRITTEN)]
    e = events[0]
    assert (e.source, e.previous_status, e.new_status) == ("system_jobs", "failed", "completed")
    assert e.run_id is not None and "after jobreaper had settled it" in (e.reason or "")
    assert sorted(s["job_id"] for s in signalled) == [e.job_id for e in events]
    assert {(s["status"], s["source"], s["task_id"]) for s in signalled} == {
        ("completed", "system_jobs", None)
    }
    logged = [r.getMessage() for r in caplog.records if "late write" in r.getMessage()]
    assert len(logged) == OVERWRITTEN, logged
    assert logged[0].startswith("jobreaper: late write to system_jobs job j0"), logged[0]
    with engine.connect() as conn:  # detection changes nothing in the user's table
        statuses = dict(
            conn.execute(select(table.c.status, func.count()).group_by(table.c.status)).all()
        )
    assert statuses == {"completed": OVERWRITTEN, "failed": OVERWRITTEN}


def test_settlements_older_than_the_window_are_not_checked(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    settle_then_overwrite(engine, sqlite_url)
    ev = tables.events
    with engine.begin() as conn:
        settled_at = conn.execute(select(func.min(ev.c.at))).scalar_one()
        conn.execute(update(ev).values(at=settled_at - timedelta(seconds=601)))
    celery_jobreaper.reap(make_app(sqlite_url, late_write_window=600))
    assert late_events(engine) == []
    celery_jobreaper.reap(make_app(sqlite_url, late_write_window=700))
    assert len(late_events(engine)) == OVERWRITTEN


def test_tables_of_an_older_release_get_the_late_write_table_and_index(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(db_url)
    create_all(engine)
    index = next(i for i in tables.events.indexes if i.name == "ix_jobreaper_events_action_at")
    index.drop(engine)  # as an older celery_jobreaper created them
    tables.late_writes.drop(engine)
    create_all(engine)
    with engine.connect() as conn:
        names = {i["name"] for i in inspect(conn).get_indexes(tables.events.name)}
        assert inspect(conn).has_table(tables.late_writes.name)
    assert index.name in names


def test_integer_ids(db_url: str, engine_for: Callable[[str], Engine]) -> None:
    """The ledger keeps ids as text; an integer id column is looked up by its value."""
    engine = engine_for(db_url)
    table = create_seed(engine, [{"job_id": i} for i in range(1, 4)], int_ids=True)
    assert celery_jobreaper.reap(make_app(db_url)).settled == 3
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.job_id == 2).values(status="completed"))
    celery_jobreaper.reap(make_app(db_url))
    assert [(e.job_id, e.new_status) for e in late_events(engine)] == [("2", "completed")]


def test_a_job_settled_twice_gets_one_late_write(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Settled, run again in the same row, settled again, then overwritten: one late write
    (the latest settlement's), however many reaps follow."""
    engine = engine_for(sqlite_url)
    table = create_seed(engine, [{"job_id": "again"}])
    assert celery_jobreaper.reap(make_app(sqlite_url)).settled == 1
    with engine.begin() as conn:  # the application runs the job again in the same row
        conn.execute(update(table).values(status="running", error=None))
    assert celery_jobreaper.reap(make_app(sqlite_url)).settled == 1
    with engine.begin() as conn:
        conn.execute(update(table).values(status="completed"))
    for _ in range(3):
        celery_jobreaper.reap(make_app(sqlite_url))
    assert [(e.job_id, e.new_status) for e in late_events(engine)] == [("again", "completed")]
