"""The set-based PostgreSQL path (celery_jobreaper.bulk) settles exactly as the Python path does.

Each scenario builds the same table in two fresh databases, reaps one with the set-based path
and one with it switched off, at the same frozen time, and compares everything observable:
the table's rows, the ledger, the report, the log lines and the ``jobs_settled`` decisions.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatchcase
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from jobtables import SEED_SOURCE
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    insert,
    literal,
    select,
    text,
)
from sqlalchemy.engine import Engine
from support import PG_ADMIN, make_app

import celery_jobreaper
from celery_jobreaper import bulk, bulk_rule, bulk_text, reaper, signals
from celery_jobreaper.clock import format_age, utcnow
from celery_jobreaper.planner import (
    UNOWNED_WHILE_WORKERS_LIVE,
    Decision,
)
from celery_jobreaper.schema import tables
from celery_jobreaper.sightings import Sightings

# A fixed "now" with a fraction of a second, so that ages are cut, not rounded.
NOW = utcnow().replace(microsecond=700_000)


@pytest.fixture
def fresh_pg() -> Iterator[Callable[[], str]]:
    """Make brand-new PostgreSQL databases (dropped afterwards); returns their URLs."""
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def make() -> str:
        name = f"jrt_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


def job_table(
    *, int_ids: bool = False, error_length: int | None = None, tz: bool = False, long: bool = False
) -> Table:
    text_type = String(300) if long else String(64)
    return Table(
        "system_jobs",
        MetaData(),
        Column("job_id", Integer if int_ids else text_type, primary_key=True, autoincrement=False),
        Column("job_type", text_type),
        Column("status", String(16), nullable=False),
        Column("started_at", DateTime(timezone=tz)),
        Column("completed_at", DateTime),
        Column("error", String(error_length) if error_length else Text),
    )


def mixed_rows(int_ids: bool = False) -> list[dict[str, Any]]:
    """Ages from seconds to days, three statuses, kinds with LIKE specials."""
    specs = [
        ("fresh", "running", "library_scan", ago(seconds=5.2)),
        ("half-minute", "scheduled", "library_scan", ago(seconds=30)),
        ("two-minutes", "running", "file_identification", ago(minutes=2, seconds=0.1)),
        ("hours", "running", "library_scan", ago(hours=2, minutes=3, seconds=4.9)),
        ("almost-a-day", "scheduled", "titledb_update", ago(hours=23, minutes=59, seconds=59.99)),
        ("one-day", "running", "library_scan", ago(days=1)),
        ("day-and-more", "running", "file_identification", ago(days=1, hours=1)),
        ("three-days", "scheduled", "titledb_update", ago(days=3, hours=4, minutes=5, seconds=6)),
        ("long-ago", "running", "library_scan", ago(days=400, seconds=1)),
        # (rows whose start is unknown send the source to the Python path: see
        # test_woken_scheduled.py; these two stand in their places)
        ("six-hours", "running", "library_scan", ago(hours=6)),
        ("six-hours-2", "scheduled", None, ago(hours=6, seconds=1)),
        ("no-kind", "running", None, ago(hours=5)),
        ("in-future", "running", "library_scan", NOW + timedelta(seconds=10)),
        ("done", "done", "library_scan", ago(days=2)),
        ("failed-already", "failed", "library_scan", ago(days=2)),
        ("ignored", "running", "maintenance_vacuum", ago(days=2)),
        ("ignored-young", "running", "maintenance_reindex", ago(seconds=1)),
        ("percent", "running", "50%_done", ago(hours=3)),
        ("percent-lookalike", "running", "50x_done", ago(hours=3)),
        ("underscore", "running", "a_b", ago(hours=3)),
        ("underscore-lookalike", "running", "axb", ago(hours=3)),
        ("backslash", "running", "back\\slash", ago(hours=3)),
        ("question", "running", "q1", ago(hours=3)),
        ("kept-by-first-glob", "running", "maintenance_keep", ago(days=2)),
        ("exactly-grace", "running", "library_scan", ago(seconds=60)),
        ("exactly-max-age", "running", "library_scan", ago(seconds=3600)),
        ("just-over-max-age", "running", "library_scan", ago(seconds=3600, microseconds=1)),
    ]
    rows = []
    for i, (name, status, kind, started) in enumerate(specs):
        rows.append(
            {
                "job_id": 1000 + i if int_ids else f"{name}-{i:02d}",
                "job_type": kind,
                "status": status,
                "started_at": started,
                "completed_at": None,
                "error": None,
            }
        )
    return rows


TOKYO_SOURCE = {**SEED_SOURCE, "timezone": "Asia/Tokyo"}
NEW_YORK_SOURCE = {**SEED_SOURCE, "timezone": "America/New_York"}


def shaped_rows(shape: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`mixed_rows`, in a local zone's wall-clock time or with long values, by *shape*."""
    rows = mixed_rows(int_ids=bool(shape.get("int_ids")))
    zone = shape.get("zone")
    if zone is not None:
        local = ZoneInfo(zone)
        for r in rows:
            if r["started_at"] is not None:
                aware = r["started_at"].replace(tzinfo=timezone.utc).astimezone(local)
                r["started_at"] = aware.replace(tzinfo=None)
    if shape.get("dst"):
        for i, started in enumerate(
            [
                datetime(2024, 11, 3, 1, 30),  # happens twice in New York
                datetime(2024, 3, 10, 2, 30),  # never happens in New York
                datetime(2024, 11, 3, 0, 59, 59),
                datetime(2024, 11, 3, 2, 0, 0),
            ]
        ):
            rows.append({**rows[2], "job_id": f"dst-{i}", "started_at": started})
    if shape.get("long"):
        rows.append({**rows[5], "job_id": "L" * 250, "job_type": "k" * 280})
        rows.append({**rows[5], "job_id": "M" * 191, "job_type": "m" * 191})
        rows.append({**rows[5], "job_id": "N" * 192, "job_type": None})
    return rows


POLICIES = {
    "maintenance_keep": "fail",  # first match wins: fails although maintenance_* is ignored
    "maintenance_*": "ignore",
    "50%_done": "ignore",  # % and _ are literal characters in a glob
    "a_b": "ignore",
    "back\\slash": "ignore",
    "q?": "ignore",
    "file_*": "fail",
}


@dataclasses.dataclass
class Outcome:
    rows: dict[Any, tuple[Any, ...]]
    events: list[tuple[Any, ...]]
    report: dict[str, Any]
    logs: list[str]
    decisions: list[Decision]
    statements: list[str]


def reap_once(
    url: str,
    *,
    fast: bool,
    table: Table,
    rows: list[dict[str, Any]],
    conf: dict[str, Any],
    other_live_worker: bool,
    detail: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    seen: dict[Any, timedelta] | None = None,
) -> Outcome:
    """Reap once; *seen*: job id -> how long before NOW the reaper first saw it (its
    sightings of rows whose start is unknown, as a long-running reaper's would be)."""
    engine = create_engine(url)
    try:
        table.create(engine)
        tz = getattr(table.c.started_at.type, "timezone", False)
        with engine.begin() as conn:
            conn.execute(
                insert(table),
                [
                    {
                        **r,
                        "started_at": r["started_at"].replace(tzinfo=timezone.utc)
                        if tz and r["started_at"] is not None
                        else r["started_at"],
                    }
                    for r in rows
                ],
            )
        celery_jobreaper.schema.create_all(engine)
        if other_live_worker:
            with engine.begin() as conn:
                conn.execute(
                    tables.incarnations.insert().values(
                        id="l" * 32,
                        node="live@h",
                        host="h",
                        pid=1,
                        started_at=ago(hours=1),
                        heartbeat_at=ago(seconds=1),
                        state="running",
                    )
                )
        monkeypatch.setattr(bulk, "ENABLED", fast)
        if seen:

            def remembering() -> Sightings:
                store = Sightings()
                for job_id, before in seen.items():
                    store.note("system_jobs", [job_id], NOW - before)
                return store

            monkeypatch.setattr(reaper, "Sightings", remembering)
        monkeypatch.setattr(reaper, "utcnow", lambda: NOW)
        monkeypatch.setattr(reaper, "db_utcnow", lambda conn: NOW)
        app = make_app(url, **conf)
        statements: list[str] = []

        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        decisions: list[Decision] = []

        def receive(sender: Any, decisions: list[Decision], **_: Any) -> None:
            settled.extend(decisions)

        settled = decisions
        caplog.clear()
        event.listen(Engine, "before_cursor_execute", record)
        if detail:
            caplog.set_level(logging.INFO, logger="celery_jobreaper")
            signals.jobs_settled.connect(receive, weak=False, dispatch_uid="test-bulk")
        else:
            caplog.set_level(logging.WARNING, logger="celery_jobreaper")
        try:
            report = celery_jobreaper.reap(app)
        finally:
            event.remove(Engine, "before_cursor_execute", record)
            signals.jobs_settled.disconnect(dispatch_uid="test-bulk")
        assert report.ok, report.error
        with engine.connect() as conn:
            table_rows = {
                r.job_id: (r.status, r.completed_at, r.error) for r in conn.execute(select(table))
            }
            ev = tables.events.c
            events = sorted(
                conn.execute(
                    select(
                        ev.at,
                        ev.source,
                        ev.job_id,
                        ev.task_id,
                        ev.kind,
                        ev.previous_status,
                        ev.new_status,
                        ev.action,
                        ev.reason,
                        ev.owner,
                    )
                ).all(),
                key=lambda e: e.job_id,
            )
        summary = report.as_dict()
        return Outcome(
            rows=table_rows,
            events=[tuple(e) for e in events],
            report={
                k: summary[k]
                for k in ("candidates", "settled", "would_settle", "left_alone", "per_source")
            },
            logs=sorted(r.getMessage() for r in caplog.records if "Clearing job" in r.getMessage()),
            decisions=sorted(decisions, key=lambda d: str(d.candidate.job_id)),
            statements=statements,
        )
    finally:
        engine.dispose()


def took_fast_path(statements: list[str]) -> bool:
    """One statement both updated the job table and wrote the ledger."""
    return any(
        "UPDATE system_jobs" in s and "INSERT INTO jobreaper_events" in s for s in statements
    )


SCENARIOS: dict[str, tuple[dict[str, Any], bool, dict[str, Any]]] = {
    # No other live worker: every stale row fails unless young or ignored; batches of 4 mix
    # settled, young and ignored rows, so the keyset must go on past pages settling nothing.
    "no-live-worker": ({"grace": 60, "policies": POLICIES, "batch_size": 4}, False, {}),
    # Another live worker: only rows older than max_age fail; the others are left with reasons.
    "live-worker-max-age": (
        {"grace": 10, "max_age": 3600, "policies": POLICIES, "batch_size": 5},
        True,
        {},
    ),
    # Another live worker and no max_age: nothing can fail; only counting.
    "live-worker-no-max-age": ({"policies": POLICIES, "batch_size": 3}, True, {}),
    # Integer ids, a batch larger than the table, no policies.
    "int-ids": ({"batch_size": 1000}, False, {"int_ids": True}),
    # An error column too short for the text: cut with "…" exactly as apply._fit does.
    "short-error-column": ({"max_age": 60, "batch_size": 7}, True, {"error_length": 80}),
    # started_at WITH TIME ZONE: ages are computed in UTC.
    "timestamptz": ({"grace": 60, "batch_size": 6}, False, {"tz": True}),
    # Naive started_at written in Tokyo's local time (the source's timezone key).
    "naive-tokyo": (
        {"grace": 60, "max_age": 3600, "batch_size": 6, "sources": [TOKYO_SOURCE]},
        True,
        {"zone": "Asia/Tokyo"},
    ),
    # Naive started_at in New York time, ambiguous and skipped wall-clock times included.
    "naive-new-york-dst": (
        {"grace": 60, "batch_size": 5, "sources": [NEW_YORK_SOURCE]},
        False,
        {"zone": "America/New_York", "dst": True},
    ),
    # Job ids and kinds longer than the ledger's columns: cut, the whole values in the reason.
    "longer-than-the-ledger": ({"batch_size": 4}, False, {"long": True}),
}


@pytest.mark.parametrize("detail", [True, False], ids=["logs-and-signal", "quiet"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_set_based_path_settles_exactly_like_the_python_path(
    scenario: str,
    detail: bool,
    fresh_pg: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    conf, live, shape = SCENARIOS[scenario]
    rows = shaped_rows(shape)
    table_shape = {k: v for k, v in shape.items() if k not in ("zone", "dst", "seen")}
    outcomes = [
        reap_once(
            fresh_pg(),
            fast=fast,
            table=job_table(**table_shape),
            rows=rows,
            conf=conf,
            other_live_worker=live,
            detail=detail,
            monkeypatch=monkeypatch,
            caplog=caplog,
            seen=shape.get("seen"),
        )
        for fast in (True, False)
    ]
    fast, slow = outcomes
    assert took_fast_path(fast.statements) or fast.report["settled"] == 0
    assert not took_fast_path(slow.statements)
    assert fast.rows == slow.rows
    assert fast.events == slow.events
    assert fast.report == slow.report
    assert fast.logs == slow.logs
    assert fast.decisions == slow.decisions
    if detail and slow.report["settled"]:
        assert fast.logs and fast.decisions
    # the scenario exercises what it claims to
    left = slow.report["left_alone"]
    if scenario.startswith("no-live-worker"):
        assert slow.report["settled"] > 5
        assert left["younger than jobreaper_grace"] >= 3
        assert left["policy 'ignore' for maintenance_vacuum"] == 1
        assert left["policy 'ignore' for 50%_done"] == 1
        assert left["policy 'ignore' for back\\slash"] == 1
        errors = {k: v[2] for k, v in slow.rows.items()}
        assert "was running for 2:03:04 with no live worker" in errors["hours-03"]
        assert "was scheduled for 23:59:59 with" in errors["almost-a-day-04"]
        assert "was running for 1 day, 0:00:00 with" in errors["one-day-05"]
        assert "was scheduled for 3 days, 4:05:06 with" in errors["three-days-07"]
        assert "was running for 400 days, 0:00:01 with" in errors["long-ago-08"]
        assert slow.rows["percent-lookalike-18"][0] == "failed"
        assert slow.rows["kept-by-first-glob-23"][0] == "failed"
    if scenario == "live-worker-max-age":
        assert "older than jobreaper_max_age (3600 s)" in slow.rows["one-day-05"][2]
        assert slow.rows["two-minutes-02"][0] == "running"
        assert left[UNOWNED_WHILE_WORKERS_LIVE] >= 3
    if scenario == "live-worker-no-max-age":
        assert slow.report["settled"] == 0 and sum(left.values()) == slow.report["candidates"]
    if scenario == "naive-tokyo":
        assert "older than jobreaper_max_age (3600 s)" in slow.rows["one-day-05"][2]
        assert "was running for 1 day, 0:00:00" in slow.rows["one-day-05"][2]
        assert slow.rows["two-minutes-02"][0] == "running"  # 2 minutes, not 9 hours, old
        assert slow.rows["fresh-00"][0] == "running"
    if scenario == "naive-new-york-dst":
        assert slow.rows["hours-03"][0] == "failed"
        assert "was running for 2:03:04" in slow.rows["hours-03"][2]
        assert all(slow.rows[f"dst-{i}"][0] == "failed" for i in range(4))
    if scenario == "longer-than-the-ledger":
        ledger = {e[2]: e for e in slow.events}
        cut = "L" * 190 + "…"
        assert ledger[cut][4] == "k" * 190 + "…"
        assert ("whole: " + "L" * 250 + "]") in ledger[cut][8]
        assert ("whole: " + "k" * 280 + "]") in ledger[cut][8]
        assert "M" * 191 in ledger and "cut to fit" not in ledger["M" * 191][8]
        assert "N" * 190 + "…" in ledger
    if scenario == "short-error-column":
        cut = [v[2] for v in slow.rows.values() if v[2] is not None]
        assert cut and all(len(e) == 80 and e.endswith("…") for e in cut)
        assert all(len(e[8]) > 80 for e in slow.events)  # the ledger keeps the whole text


@pytest.mark.parametrize(
    ("source", "conf", "dry_run", "enabled", "fast"),
    [
        (SEED_SOURCE, {}, False, True, True),
        (SEED_SOURCE, {"policies": {"lib*": "ignore"}}, False, True, True),
        ({**SEED_SOURCE, "owner": "owner"}, {}, False, True, False),
        ({**SEED_SOURCE, "task_id": "task_id"}, {}, False, True, False),
        (SEED_SOURCE, {"policies": {"lib[a-z]*": "ignore"}}, False, True, False),
        (SEED_SOURCE, {}, True, True, False),
        (SEED_SOURCE, {}, False, False, False),
    ],
    ids=["seed", "translatable-glob", "owner", "task-id", "bracket-glob", "dry-run", "disabled"],
)
def test_set_based_path_taken_only_when_sql_can_decide(
    source: dict[str, Any],
    conf: dict[str, Any],
    dry_run: bool,
    enabled: bool,
    fast: bool,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = create_engine(pg_url)
    try:
        table = job_table()
        table.append_column(Column("owner", String(191)))
        table.append_column(Column("task_id", String(191)))
        table.create(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(table),
                [
                    {
                        "job_id": f"j{i}",
                        "job_type": "other",
                        "status": "running",
                        "started_at": ago(days=1),
                    }
                    for i in range(5)
                ],
            )
        monkeypatch.setattr(bulk, "ENABLED", enabled)
        statements: list[str] = []

        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        event.listen(Engine, "before_cursor_execute", record)
        try:
            report = celery_jobreaper.reap(
                make_app(pg_url, sources=[source], **conf), dry_run=dry_run
            )
        finally:
            event.remove(Engine, "before_cursor_execute", record)
        assert took_fast_path(statements) is fast
        assert (report.would_settle if dry_run else report.settled) == 5
    finally:
        engine.dispose()


def test_age_text_matches_format_age(pg_url: str) -> None:
    """The SQL writing of an age is Python's ``str(timedelta)`` cut to whole seconds."""
    ages = [
        timedelta(0),
        timedelta(microseconds=1),
        timedelta(seconds=5, microseconds=999_999),
        timedelta(seconds=59),
        timedelta(minutes=1),
        timedelta(hours=2, minutes=3, seconds=4),
        timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999),
        timedelta(days=1),
        timedelta(days=1, microseconds=1),
        timedelta(days=1, hours=23, minutes=59, seconds=59),
        timedelta(days=2),
        timedelta(days=3, hours=4, minutes=5, seconds=6),
        timedelta(days=400, seconds=1),
        timedelta(days=10_000, hours=23),
        -timedelta(seconds=5),
        -timedelta(days=2),
    ]
    now = datetime(2026, 3, 1, 12, 0, 0, 250_000)
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            for i, age in enumerate(ages):
                started = bindparam(f"s{i}", now - age, type_=DateTime())
                sql = bulk_text.format_age(literal(now, DateTime()) - started)
                assert conn.execute(select(sql)).scalar_one() == format_age(age), age
    finally:
        engine.dispose()


def test_globs_as_like_patterns_match_like_fnmatchcase(pg_url: str) -> None:
    globs = ["*", "lib*", "*scan", "q?", "50%_done", "a_b", "back\\slash", "*%*", "?_?", "a*b*c"]
    kinds = [
        "library_scan",
        "q1",
        "q12",
        "50%_done",
        "50x_done",
        "a_b",
        "axb",
        "back\\slash",
        "backslash",
        "x%y",
        "xy",
        "1_2",
        "1x2",
        "abc",
        "aXbYc",
        "ac",
        "",
    ]
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            for glob in globs:
                like = bulk_rule.glob_to_like(glob)
                assert like is not None
                for kind in kinds:
                    matched = conn.execute(
                        select(literal(kind, Text).like(like, escape=bulk_rule.LIKE_ESCAPE))
                    ).scalar_one()
                    assert matched == fnmatchcase(kind, glob), (glob, kind)
        assert bulk_rule.glob_to_like("lib[ab]*") is None
    finally:
        engine.dispose()
