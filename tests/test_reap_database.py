"""reap() on real PostgreSQL, MariaDB and SQLite: the seed scenario, dry run, ledger, errors."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import Column, Enum, Integer, MetaData, String, Table, func, select, text, update
from sqlalchemy.engine import Engine
from support import make_app

import celery_jobreaper
from celery_jobreaper import ConfigurationError, SchemaVersionError
from celery_jobreaper.errors import MissingTableError
from celery_jobreaper.schema import tables


def rows(engine: Engine, table: Table) -> dict[Any, Any]:
    with engine.connect() as conn:
        return {r.job_id: r for r in conn.execute(select(table))}


def test_seed_scenario_fails_stuck_job_with_age_and_leaves_finished(
    db_url: str, engine_for: Callable[[str], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_for(db_url)
    table = create_seed(
        engine,
        [
            {"job_id": "scan_library_123abc"},
            {
                "job_id": "identify_456def",
                "job_type": "file_identification",
                "status": "scheduled",
                "started_at": ago(hours=2),
            },
            {"job_id": "done", "status": "completed", "completed_at": ago(hours=1)},
        ],
    )
    app = make_app(db_url)
    caplog.set_level("INFO", logger="celery_jobreaper")

    report = celery_jobreaper.reap(app)

    assert report.settled == 2 and report.ok
    got = rows(engine, table)
    scan = got["scan_library_123abc"]
    assert scan.status == "failed" and scan.completed_at is not None
    # Ages are measured with the database's clock, read when the run starts judging.
    assert re.search(r"was running for 1 day, 0:0\d:\d\d ", scan.error), scan.error
    assert re.search(r"was scheduled for 2:0\d:\d\d ", got["identify_456def"].error)
    assert got["done"].status == "completed" and got["done"].error is None
    assert "jobreaper: Clearing job: scan_library_123abc (library_scan)" in caplog.text
    with engine.connect() as conn:
        events = conn.execute(select(tables.events)).all()
        run = conn.execute(select(tables.runs).where(tables.runs.c.id == report.run_id)).one()
    assert sorted(e.job_id for e in events) == ["identify_456def", "scan_library_123abc"]
    assert {(e.previous_status, e.new_status, e.action) for e in events} == {
        ("running", "failed", "settled"),
        ("scheduled", "failed", "settled"),
    }
    assert (run.trigger, run.settled, run.dry_run, run.error) == ("manual", 2, False, None)
    assert run.finished_at is not None and run.duration >= 0

    again = celery_jobreaper.reap(app)
    assert again.settled == 0 and again.candidates == 0
    assert "jobreaper: No stale jobs found" in caplog.text


def test_dry_run_changes_no_job(db_url: str, engine_for: Callable[[str], Engine]) -> None:
    engine = engine_for(db_url)
    table = create_seed(engine, [{"job_id": "a"}, {"job_id": "b"}])
    report = celery_jobreaper.reap(make_app(db_url), dry_run=True)
    assert (report.settled, report.would_settle) == (0, 2)
    assert {p["job_id"] for p in report.planned} == {"a", "b"}
    assert {r.status for r in rows(engine, table).values()} == {"running"}
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tables.events)).scalar() == 0


def test_owner_column_and_incarnations_make_it_precise(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Jobs of a dead owner are failed, and (a day old) of a never-registered silent owner;
    a live owner's are left."""
    engine = engine_for(pg_url)
    source = {**SEED_SOURCE, "owner": "owner"}
    app = make_app(pg_url, sources=[source])
    table = create_seed(
        engine,
        [
            {"job_id": "dead-job", "owner": "dead@h"},
            {"job_id": "live-job", "owner": "live@h"},
            {"job_id": "unknown-job", "owner": "stranger@h"},
            {"job_id": "unowned", "owner": None},
        ],
        owner=True,
    )
    celery_jobreaper.schema.create_all(engine)
    with engine.begin() as conn:
        for inc, node, beat in (
            ("d" * 32, "dead@h", ago(minutes=10)),
            ("l" * 32, "live@h", ago(seconds=1)),
        ):
            conn.execute(
                tables.incarnations.insert().values(
                    id=inc,
                    node=node,
                    host="h",
                    pid=1,
                    started_at=ago(hours=1),
                    heartbeat_at=beat,
                    state="running",
                )
            )

    report = celery_jobreaper.reap(app)

    got = rows(engine, table)
    assert got["dead-job"].status == "failed"
    assert "dead@h, which stopped" in got["dead-job"].error
    assert got["live-job"].status == "running"
    assert got["unknown-job"].status == "failed"
    assert "never registered with jobreaper" in got["unknown-job"].error
    assert got["unowned"].status == "running"  # another live worker exists: not provable
    assert report.settled == 2 and sum(report.left_alone.values()) == 2
    with engine.connect() as conn:
        state = conn.execute(
            select(tables.incarnations.c.state).where(tables.incarnations.c.id == "d" * 32)
        ).scalar()
    assert state == "dead"


def test_unknown_table_is_refused_by_reap_and_never_sql(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """``reap()`` outside a worker raises for a missing table (a worker skips it and retries:
    tests/test_missing_table.py); the name is looked up, never run as SQL."""
    engine = engine_for(db_url)
    create_seed(engine, [])
    evil = "system_jobs; DROP TABLE system_jobs"
    app = make_app(db_url, sources=[{**SEED_SOURCE, "table": evil}])
    with pytest.raises(MissingTableError) as info:
        celery_jobreaper.reap(app)
    assert info.value.key == "jobreaper_sources[0].table"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM system_jobs")).scalar() == 0


def test_missing_column_names_the_role(db_url: str, engine_for: Callable[[str], Engine]) -> None:
    create_seed(engine_for(db_url), [])
    app = make_app(db_url, sources=[{**SEED_SOURCE, "status": "state"}])
    with pytest.raises(ConfigurationError, match="has no column 'state'") as info:
        celery_jobreaper.reap(app)
    assert info.value.key == "jobreaper_sources[0].status"


def test_wrong_status_mapping_against_an_enum_column(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg_url)
    Table(
        "jobs",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("status", Enum("queued", "running", "done", "error", name="job_status")),
    ).create(engine)
    app = make_app(
        pg_url,
        sources=[
            {"table": "jobs", "stale_statuses": ["queued", "running"], "failed_status": "failed"}
        ],
    )
    with pytest.raises(ConfigurationError, match="'failed' is not a value") as info:
        celery_jobreaper.reap(app)
    assert info.value.key == "jobreaper_sources[0].failed_status"


def test_time_column_must_be_a_time(pg_url: str, engine_for: Callable[[str], Engine]) -> None:
    engine = engine_for(pg_url)
    Table(
        "jobs",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("status", String(10)),
        Column("began", String(30)),
    ).create(engine)
    app = make_app(pg_url, sources=[{"table": "jobs", "started_at": "began"}])
    with pytest.raises(ConfigurationError) as info:
        celery_jobreaper.reap(app)
    assert info.value.key == "jobreaper_sources[0].started_at"


def test_newer_schema_version_is_refused(pg_url: str, engine_for: Callable[[str], Engine]) -> None:
    engine = engine_for(pg_url)
    table = create_seed(engine, [{"job_id": "a"}])
    celery_jobreaper.schema.create_all(engine)
    with engine.begin() as conn:
        conn.execute(update(tables.meta).values(value="99"))
    with pytest.raises(SchemaVersionError, match="99 is newer"):
        celery_jobreaper.reap(make_app(pg_url))
    assert rows(engine, table)["a"].status == "running"


def test_create_tables_off_needs_existing_tables(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    create_seed(engine_for(pg_url), [])
    with pytest.raises(SchemaVersionError, match="create the tables"):
        celery_jobreaper.reap(make_app(pg_url, create_tables=False))
