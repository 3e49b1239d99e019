"""A job without owner whose start is unknown is aged by when a reaper first saw it (DESIGN §2.1).

Adversarial review (h-review): the woken-worker guard of the "no live worker" rule ages a job
by its ``started_at``; a job whose start is NULL was still failed at once. The seed's own table
has such jobs: ``scheduled`` is a stale status and a scheduled job has not started yet. A worker
woken from a pause (marked dead meanwhile; busy ``-P solo``, no reply) that schedules a job
before its first heartbeat lands got that new job failed while it was alive — the case the
guard was added for, with the other of the seed's two stale statuses. Now such a job (and every
job of a table without ``started_at`` column) is failed on "no live worker" only once the same
reaper has seen it for longer than ``jobreaper_heartbeat_timeout`` with still nobody live: a
live worker heartbeats within its interval. A new reaper (a new process) knows no sighting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from jobtables import SEED_SOURCE, create_seed, seed_table
from sqlalchemy import Column, MetaData, String, Table, Text, event, insert, select
from sqlalchemy.engine import Engine
from support import make_app
from test_woken_worker import _paused_and_marked_dead, _reaper

from celery_jobreaper import Settings, bulk
from celery_jobreaper.database import Database
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.rules import NO_LIVE_WORKER_LEFT, START_UNKNOWN_SEEN_BRIEFLY

#: Short enough to wait for in a test (the timeout must exceed the heartbeat interval).
TIMEOUT = 1.0
SHORT = {"heartbeat_interval": 0.5, "heartbeat_timeout": TIMEOUT, "grace": 0}


def test_new_scheduled_job_of_a_worker_woken_before_its_heartbeat_is_left_alone(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(db_url)
    table = create_seed(engine, [])
    reaper, db = _reaper(db_url, task_id=False)
    try:
        _paused_and_marked_dead(engine, reaper)
        # W wakes; its task schedules a new job (not started yet) before W's heartbeat lands.
        with engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    job_id="new-scheduled",
                    job_type="library_scan",
                    status="scheduled",
                    started_at=None,
                )
            )
        report = reaper.run("manual")
    finally:
        db.dispose()
    with engine.connect() as conn:
        row = conn.execute(select(table)).one()
    assert row.status == "scheduled", (report, row.error)
    assert report.left_alone == {START_UNKNOWN_SEEN_BRIEFLY: 1}


def _table(engine: Engine, shape: str) -> tuple[Table, dict[str, Any]]:
    """The seed's table (started_at NULL), with a task-id column, or with no started_at."""
    if shape == "no-started-at":
        table = Table(
            "system_jobs",
            MetaData(),
            Column("job_id", String(64), primary_key=True),
            Column("job_type", String(64)),
            Column("status", String(16), nullable=False),
            Column("error", Text),
        )
        source = {k: v for k, v in SEED_SOURCE.items() if k not in ("started_at", "completed_at")}
    else:
        table = seed_table(MetaData(), task_id=shape == "task_id")
        source = {**SEED_SOURCE, **({"task_id": "task_id"} if shape == "task_id" else {})}
    table.create(engine)
    row: dict[str, Any] = {"job_id": "unknown-start", "job_type": "library_scan"}
    row["status"] = "scheduled"
    if shape == "task_id":
        row["task_id"] = "t-unknown"
    with engine.begin() as conn:
        conn.execute(insert(table).values(**row))
    return table, source


def _silent(url: str, source: dict[str, Any]) -> tuple[Reaper, Database]:
    """A reaper that is not a worker; nobody answers its pings (no worker at all)."""
    app = make_app(url, sources=[source], **SHORT)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(app, settings, db, ping=lambda nodes, t: set(), ask=lambda n, ids, t: set())
    reaper.prepare_tables()
    return reaper, db


def _status(engine: Engine, table: Table) -> tuple[str, str | None]:
    with engine.connect() as conn:
        row = conn.execute(select(table.c.status, table.c.error)).one()
    return row.status, row.error


@pytest.mark.parametrize("shape", ["seed", "task_id", "no-started-at"])
def test_start_unknown_is_failed_once_seen_longer_than_the_timeout(
    db_url: str, engine_for: Callable[[str], Engine], shape: str
) -> None:
    """(a) Seen for longer than the heartbeat timeout with nobody live: failed on "no live
    worker" by the reaper that saw it; (b) a new reaper (no sightings) leaves it at its first
    sight, however long the job has existed."""
    engine = engine_for(db_url)
    table, source = _table(engine, shape)
    seer, db1 = _silent(db_url, source)
    newcomer, db2 = _silent(db_url, source)
    try:
        first = seer.run("manual")
        assert _status(engine, table)[0] == "scheduled", first
        assert first.left_alone == {START_UNKNOWN_SEEN_BRIEFLY: 1}
        time.sleep(TIMEOUT + 0.5)
        fresh = newcomer.run("manual")  # (b): first sight for this one
        assert _status(engine, table)[0] == "scheduled", fresh
        assert fresh.left_alone == {START_UNKNOWN_SEEN_BRIEFLY: 1}
        again = seer.run("manual")  # (a): seen for longer than the timeout
    finally:
        db1.dispose()
        db2.dispose()
    status, error = _status(engine, table)
    assert status == "failed", again
    assert NO_LIVE_WORKER_LEFT in (error or "")
    assert again.settled == 1


def test_sightings_of_jobs_gone_are_forgotten_at_the_end_of_a_run(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """The store holds only the rows the last run saw: a job that got a start (or finished) is
    forgotten, so it is not remembered as seen long ago if it is ever NULL again."""
    engine = engine_for(sqlite_url)
    table, source = _table(engine, "seed")
    seer, db = _silent(sqlite_url, source)
    try:
        seer.run("manual")
        assert dict(seer.sightings.first_seen("system_jobs")).keys() == {"unknown-start"}
        with engine.begin() as conn:
            conn.execute(table.update().values(status="done"))
        seer.run("manual")
        assert len(seer.sightings) == 0
    finally:
        db.dispose()


@pytest.mark.parametrize("shape", ["seed", "no-started-at"])
def test_set_based_path_ages_a_start_unknown_by_its_first_sighting(
    pg_url: str, engine_for: Callable[[str], Engine], shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(c) The same where PostgreSQL's one-statement path (bulk.py) would otherwise be taken: a
    source with a stale row whose start is unknown is left to the Python path, which notes
    sightings in every run, batch by batch (review 2: the set-based path noted them only in
    runs without a live worker and bound every sighting into every page)."""
    monkeypatch.setattr(bulk, "ENABLED", True)
    engine = engine_for(pg_url)
    table, source = _table(engine, shape)
    seer, db1 = _silent(pg_url, source)
    newcomer, db2 = _silent(pg_url, source)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        first = seer.run("manual")
        assert not any("jr_page" in s for s in statements), "the set-based path was taken"
        assert _status(engine, table)[0] == "scheduled", first
        assert first.left_alone == {START_UNKNOWN_SEEN_BRIEFLY: 1}
        time.sleep(TIMEOUT + 0.5)
        fresh = newcomer.run("manual")
        assert _status(engine, table)[0] == "scheduled", fresh
        assert fresh.left_alone == {START_UNKNOWN_SEEN_BRIEFLY: 1}
        statements.clear()
        again = seer.run("manual")
    finally:
        event.remove(Engine, "before_cursor_execute", record)
        db1.dispose()
        db2.dispose()
    assert not any("jr_page" in s for s in statements)
    status, error = _status(engine, table)
    assert status == "failed", again
    assert NO_LIVE_WORKER_LEFT in (error or "")
    assert again.settled == 1
