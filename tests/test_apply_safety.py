"""Exactly once by construction (issue 6, item 6), naive time zones (item 5), ledger and log text
(item 10): on real PostgreSQL, MariaDB and SQLite."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from celery.worker import state as worker_state
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from support import WorkerProcess, make_app, worker_env

import celery_jobreaper
from celery_jobreaper import ConfigurationError, bulk
from celery_jobreaper.apply import settle_batch
from celery_jobreaper.clock import utcnow
from celery_jobreaper.database import Database
from celery_jobreaper.planner import Decision
from celery_jobreaper.report import Report
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.settings import Settings
from celery_jobreaper.sources import UserTableSource, resolve_table
from celery_jobreaper.textsafe import safe


def events(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(tables.events)).all())


# -- the id column must be unique ------------------------------------------------------------


def _jobs_table(*extra: Any, pk: bool = False) -> Table:
    return Table(
        "jobs",
        MetaData(),
        Column("rowno", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(64), nullable=False),
        Column("status", String(16), nullable=False),
        Column("owner", String(191)),
        Column("started_at", DateTime),
        *extra,
    )


@pytest.mark.parametrize("shape", ["plain", "composite-unique", "non-unique-index"])
def test_id_column_that_is_not_unique_is_refused(
    shape: str, db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Two rows share ``job_id`` (a dead owner's and a live owner's): the source is refused."""
    engine = engine_for(db_url)
    extra: list[Any] = []
    if shape == "composite-unique":
        extra.append(UniqueConstraint("job_id", "owner"))
    if shape == "non-unique-index":
        extra.append(Index("ix_jobs_job_id", "job_id"))
    table = _jobs_table(*extra)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table),
            [
                {"job_id": "same", "status": "running", "owner": "dead@h"},
                {"job_id": "same", "status": "running", "owner": "live@h"},
            ],
        )
    app = make_app(db_url, sources=[{"table": "jobs", "id": "job_id", "owner": "owner"}])
    with pytest.raises(ConfigurationError, match="primary key or unique") as info:
        celery_jobreaper.reap(app)
    assert info.value.key == "jobreaper_sources[0].id"
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalars().all() == ["running", "running"]


@pytest.mark.parametrize("shape", ["unique-constraint", "unique-index"])
def test_unique_id_column_is_accepted(
    shape: str, db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(db_url)
    extra: Any = (
        UniqueConstraint("job_id", name="uq_jobs_job_id")
        if shape == "unique-constraint"
        else Index("ix_jobs_job_id", "job_id", unique=True)
    )
    table = _jobs_table(extra)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table), [{"job_id": "a", "status": "running", "started_at": ago(days=1)}]
        )
    # (a start known: a job whose start is unknown is not failed at a reaper's first sight)
    source = {"table": "jobs", "id": "job_id", "started_at": "started_at"}
    report = celery_jobreaper.reap(make_app(db_url, sources=[source]))
    assert report.ok and report.settled == 1


def test_a_given_table_object_without_unique_id_is_refused(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """A ``Table`` handed in (not reflected) is checked against the database too."""
    engine = engine_for(sqlite_url)
    table = _jobs_table()
    table.create(engine)
    declared = Table(
        "jobs",
        MetaData(),
        Column("job_id", String(64), primary_key=True),  # the model claims a key the table lacks
        Column("status", String(16)),
    )
    app = make_app(sqlite_url, sources=[{"table": declared, "id": "job_id"}])
    with pytest.raises(ConfigurationError, match="primary key or unique") as info:
        celery_jobreaper.reap(app)
    assert info.value.key == "jobreaper_sources[0].id"


# -- compare-and-set: read, then someone else changes the row, then apply ----------------------


def _source(conn: Connection, url: str, **spec: Any) -> UserTableSource:
    settings = Settings.from_app(make_app(url, sources=[{**SEED_SOURCE, **spec}]))
    s = settings.sources[0]
    source = UserTableSource(s, resolve_table(s, conn))
    conn.rollback()  # end the reflection's transaction
    return source


def _decisions(source: UserTableSource, conn: Connection) -> list[Decision]:
    with conn.begin():
        batch = source.batch(conn, None, 100)
    return [Decision(c, "fail", "test", "Job reset by test") for c in batch]


@pytest.mark.parametrize("locks", [True, False], ids=["row-locks", "no-row-locks"])
def test_job_restarted_between_read_and_apply_is_not_settled(
    locks: bool,
    db_url: str,
    engine_for: Callable[[str], Engine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The job finished and started again (same status, new started_at): no settle, no event.

    Without row locks (a dialect without ``FOR UPDATE``; SQLite is serialised by ``BEGIN
    IMMEDIATE`` instead, so it gets the change before the whole apply) the change lands between
    the lock-and-check read and the UPDATE: only the UPDATE's compare-and-set can see it.
    """
    engine = engine_for(db_url)
    table = create_seed(engine, [{"job_id": "a"}, {"job_id": "b"}])
    create_all(engine)
    db = Database(engine, owned=False)
    db.skip_locked = db.skip_locked and locks
    other = engine_for(db_url)
    restarted = utcnow().replace(microsecond=0)
    caplog.set_level(logging.DEBUG, logger="celery_jobreaper.apply")

    def restart() -> None:
        with other.begin() as c:
            c.execute(
                update(table)
                .where(table.c.job_id == "a")
                .values(status="done", completed_at=restarted)
            )
        with other.begin() as c:
            c.execute(
                update(table)
                .where(table.c.job_id == "a")
                .values(status="running", started_at=restarted, completed_at=None)
            )

    with engine.connect() as conn:
        source = _source(conn, db_url)
        decisions = _decisions(source, conn)
        assert [d.candidate.job_id for d in decisions] == ["a", "b"]
        hook = None
        if locks or engine.dialect.name == "sqlite":
            restart()
        else:
            seen = {"select": False}

            def between(c: Any, cursor: Any, statement: str, *args: Any) -> None:
                if statement.lstrip().upper().startswith("SELECT") and not seen["select"]:
                    seen["select"] = True
                    restart()

            hook = between
            event.listen(conn, "after_cursor_execute", hook)
        try:
            with conn.begin():
                done = settle_batch(
                    conn, db, tables, source.target, decisions, now=utcnow(), run_id=None
                )
        finally:
            if hook is not None:
                event.remove(conn, "after_cursor_execute", hook)
    assert [d.candidate.job_id for d in done] == ["b"]
    assert "changed since they were judged (finished, started again" in caplog.text
    with engine.connect() as conn:
        got = {r.job_id: r for r in conn.execute(select(table))}
    assert got["a"].status == "running" and got["a"].error is None
    assert got["b"].status == "failed"
    assert [e.job_id for e in events(engine)] == ["b"]


def test_row_settled_by_someone_else_gets_no_event(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Another reaper settled the row between our read and our update: not ours to record."""
    engine = engine_for(db_url)
    table = create_seed(engine, [{"job_id": "a"}, {"job_id": "b"}])
    create_all(engine)
    db = Database(engine, owned=False)
    db.skip_locked = False  # no row locks: only the UPDATE's compare-and-set decides
    other = engine_for(db_url)
    with engine.connect() as conn:
        source = _source(conn, db_url)
        decisions = _decisions(source, conn)
        if engine.dialect.name == "sqlite":
            with other.begin() as c:
                c.execute(update(table).where(table.c.job_id == "a").values(status="failed"))
            hook = None
        else:
            seen = {"select": False}

            def between(c: Any, cursor: Any, statement: str, *args: Any) -> None:
                if statement.lstrip().upper().startswith("SELECT") and not seen["select"]:
                    seen["select"] = True
                    with other.begin() as oc:
                        oc.execute(
                            update(table).where(table.c.job_id == "a").values(status="failed")
                        )

            hook = between
            event.listen(conn, "after_cursor_execute", hook)
        with conn.begin():
            done = settle_batch(
                conn, db, tables, source.target, decisions, now=utcnow(), run_id=None
            )
    assert [d.candidate.job_id for d in done] == ["b"]
    assert [e.job_id for e in events(engine)] == ["b"]


# -- SQLite through jobreaper_engine ------------------------------------------------------------


def test_borrowed_sqlite_engine_begins_immediate(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    create_seed(engine, [{"job_id": "a"}])
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        app = make_app(sqlite_url)
        app.conf.jobreaper_database_url = None
        app.conf.jobreaper_engine = engine
        report = celery_jobreaper.reap(app)
        with engine.begin() as conn:  # the application's own transactions stay as they were
            n = len(statements)
            conn.execute(text("SELECT 1"))
            assert statements[n:] == ["SELECT 1"]
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert report.settled == 1
    assert "BEGIN IMMEDIATE" in statements


def test_two_reapers_on_a_borrowed_sqlite_engine_settle_each_job_once(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    n = 400
    engine = engine_for(sqlite_url)
    table = create_seed(engine, [{"job_id": f"j{i:04d}"} for i in range(n)], int_ids=False)
    create_all(engine)
    barrier = threading.Barrier(2)
    reports: list[Report] = []
    errors: list[BaseException] = []
    borrowed = [create_engine(sqlite_url, connect_args={"timeout": 60}) for _ in range(2)]

    def reaper(borrowed_engine: Engine) -> None:
        try:
            app = make_app(sqlite_url, batch_size=20)
            app.conf.jobreaper_database_url = None
            app.conf.jobreaper_engine = borrowed_engine
            barrier.wait()
            reports.append(celery_jobreaper.reap(app))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=reaper, args=(e,)) for e in borrowed]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        for e in borrowed:
            e.dispose()
    assert not errors, errors
    assert sum(r.settled for r in reports) == n
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(table.c.status == "failed")).scalar() == n
    per_job: dict[str, int] = {}
    for e in events(engine):
        per_job[e.job_id] = per_job.get(e.job_id, 0) + 1
    assert len(per_job) == n and set(per_job.values()) == {1}


# -- time zones of naive started_at ------------------------------------------------------------


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Sao_Paulo"])
def test_naive_started_at_is_read_in_the_source_time_zone(
    zone: str, db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Local wall-clock times: 10 minutes ago is young, 2 hours ago is older than max_age."""
    engine = engine_for(db_url)
    local_now = utcnow().replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo(zone))
    local_now = local_now.replace(tzinfo=None)
    table = create_seed(
        engine,
        [
            {"job_id": "ten-minutes", "started_at": local_now - timedelta(minutes=10)},
            {"job_id": "two-hours", "started_at": local_now - timedelta(hours=2)},
        ],
    )
    create_all(engine)
    with engine.begin() as conn:  # another live worker: only max_age can fail a job
        conn.execute(
            tables.incarnations.insert().values(
                id="l" * 32,
                node="live@h",
                host="h",
                pid=1,
                started_at=ago(hours=1),
                heartbeat_at=utcnow(),
                state="running",
            )
        )
    app = make_app(db_url, max_age=3600, sources=[{**SEED_SOURCE, "timezone": zone}])
    report = celery_jobreaper.reap(app)
    assert report.ok, report.error
    with engine.connect() as conn:
        got = {r.job_id: r for r in conn.execute(select(table))}
    assert got["ten-minutes"].status == "running"
    assert got["two-hours"].status == "failed"
    assert "was running for 2:00:" in got["two-hours"].error
    assert report.settled == 1


def test_unknown_time_zone_names_the_key(sqlite_url: str) -> None:
    app = make_app(sqlite_url, sources=[SEED_SOURCE, {**SEED_SOURCE, "timezone": "Mars/Olympus"}])
    with pytest.raises(ConfigurationError, match="Mars/Olympus") as info:
        Settings.from_app(app)
    assert info.value.key == "jobreaper_sources[1].timezone"


# -- ledger: values longer than its columns ----------------------------------------------------


def test_task_id_longer_than_the_ledger_column(
    db_url: str, engine_for: Callable[[str], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    # an embedded worker earlier in the session may leave the root logger at ERROR
    caplog.set_level(logging.WARNING, logger="celery_jobreaper.ledger")
    engine = engine_for(db_url)
    long_task = "t" * 299 + "Z"
    long_job = "j" * 299 + "Z"
    table = Table(
        "jobs",
        MetaData(),
        Column("job_id", String(300), primary_key=True),
        Column("status", String(16), nullable=False),
        Column("started_at", DateTime),
        Column("error", Text),
        Column("task_id", String(300)),
    )
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table),
            [
                {
                    "job_id": long_job,
                    "status": "running",
                    "task_id": long_task,
                    "started_at": ago(days=1),
                }
            ],
        )
    source = {"table": "jobs", "id": "job_id", "task_id": "task_id", "started_at": "started_at"}
    app = make_app(db_url, sources=[source])
    try:
        report = celery_jobreaper.reap(app)
    finally:
        worker_state.revoked.discard(long_task)  # the sweep's in-process memory of settled ids
    assert report.ok, report.error
    assert report.settled == 1
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalar() == "failed"
    (ev,) = events(engine)
    assert len(ev.task_id) <= 191 and ev.task_id.endswith("…")
    assert ev.task_id[:-1] == long_task[: len(ev.task_id) - 1]
    assert len(ev.job_id) <= 191 and ev.job_id.endswith("…")
    assert long_task in ev.reason and long_job in ev.reason  # the whole values are kept
    cut = [r.getMessage() for r in caplog.records if "cut to its column" in r.getMessage()]
    assert any("ledger task_id of 300 characters cut to its column's 191" in m for m in cut), cut


# -- log lines ---------------------------------------------------------------------------------


def test_safe_escapes_control_characters() -> None:
    assert safe("plain id-1") == "plain id-1"
    assert safe("a\nb\x1b[31mc\r\t\x00\x7f\u2028") == "a\\nb\\x1b[31mc\\r\\t\\x00\\x7f\\u2028"
    assert safe(None) == "None" and safe(42) == "42"


@pytest.mark.parametrize("url_fixture", ["sqlite_url", "pg_url"])
def test_job_id_and_kind_are_logged_escaped_on_one_line(
    url_fixture: str,
    request: pytest.FixtureRequest,
    engine_for: Callable[[str], Engine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job id with a newline and an ANSI escape (Python path on SQLite, set-based on PG)."""
    url = str(request.getfixturevalue(url_fixture))
    engine = engine_for(url)
    evil_id, evil_kind = "evil\nforged line\x1b[31mred", "kind\x1b[0m\n"
    create_seed(engine, [{"job_id": evil_id, "job_type": evil_kind}])
    caplog.set_level(logging.INFO, logger="celery_jobreaper")
    report = celery_jobreaper.reap(make_app(url))
    assert report.settled == 1
    # (the broker sweep's own log lines are another module's)
    messages = [r.getMessage() for r in caplog.records if r.name == "celery_jobreaper.reaper"]
    assert messages
    for message in messages:
        assert "\n" not in message and "\x1b" not in message, message
    assert any(
        "Clearing job: evil\\nforged line\\x1b[31mred (kind\\x1b[0m\\n)" in m for m in messages
    ), messages


# -- real workers ------------------------------------------------------------------------------


def test_worker_refuses_a_source_whose_id_is_not_unique(
    pg_url: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
    unique: str,
) -> None:
    """A real worker stops at start, naming ``jobreaper_sources[0].id``; no row is touched."""
    engine = engine_for(pg_url)
    table = _jobs_table()
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table),
            [
                {"job_id": "same", "status": "running", "owner": "dead@h"},
                {"job_id": "same", "status": "running", "owner": "live@h"},
            ],
        )
    sources = [{"table": "jobs", "id": "job_id", "owner": "owner"}]
    worker = start_worker(f"dup-{unique}@h", env=worker_env(pg_url, f"q-{unique}", sources=sources))
    code = worker.proc.wait(timeout=60)
    out = worker.output()
    assert code != 0, out
    assert "ready." not in out
    assert "jobreaper: invalid setting jobreaper_sources[0].id" in out, out
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalars().all() == ["running", "running"]


def test_worker_start_reads_naive_times_in_the_source_zone(
    db_url: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
    unique: str,
) -> None:
    """A worker's startup reap with ``grace`` one hour, a table written in Tokyo time.

    Read as UTC, the job started 10 minutes ago (Tokyo time) would look 9 hours old and be
    failed; read in Asia/Tokyo it is younger than the grace and left alone.
    """
    engine = engine_for(db_url)
    tokyo_now = utcnow().replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo("Asia/Tokyo"))
    tokyo_now = tokyo_now.replace(tzinfo=None)
    table = create_seed(
        engine,
        [
            {"job_id": "ten-minutes", "started_at": tokyo_now - timedelta(minutes=10)},
            {"job_id": "two-hours", "started_at": tokyo_now - timedelta(hours=2)},
        ],
    )
    sources = [{**SEED_SOURCE, "timezone": "Asia/Tokyo"}]
    worker = start_worker(
        f"tz-{unique}@h",
        env=worker_env(db_url, f"q-{unique}", sources=sources, grace=3600, track_tasks=False),
    )
    out = worker.wait_for(r"ready\.", timeout=90)
    assert "Clearing job: two-hours" in out, out
    with engine.connect() as conn:
        got = {r.job_id: r for r in conn.execute(select(table))}
    assert got["ten-minutes"].status == "running"
    assert got["two-hours"].status == "failed" and "was running for 2:00:" in got["two-hours"].error
    worker.stop()


@pytest.mark.parametrize("url_fixture", ["mysql_url", "pg_url"])
def test_concurrent_reapers_without_row_locks_settle_each_job_once(
    url_fixture: str,
    request: pytest.FixtureRequest,
    engine_for: Callable[[str], Engine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As on a database without ``FOR UPDATE``: only the compare-and-set keeps it exact.

    (On PostgreSQL the set-based path, which locks in its one statement, is switched off.)
    """
    n = 600
    url = str(request.getfixturevalue(url_fixture))
    monkeypatch.setattr(bulk, "ENABLED", False)
    engine = engine_for(url)
    table = create_seed(engine, [{"job_id": f"j{i:04d}"} for i in range(n)])
    create_all(engine)
    original = Database.__init__

    def without_row_locks(self: Database, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.skip_locked = False

    monkeypatch.setattr(Database, "__init__", without_row_locks)
    barrier = threading.Barrier(4)
    reports: list[Report] = []
    errors: list[BaseException] = []

    def reaper() -> None:
        try:
            app = make_app(url, batch_size=50)
            barrier.wait()
            reports.append(celery_jobreaper.reap(app))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=reaper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sum(r.settled for r in reports) == n
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(table.c.status == "failed")).scalar() == n
    per_job: dict[str, int] = {}
    for e in events(engine):
        per_job[e.job_id] = per_job.get(e.job_id, 0) + 1
    assert len(per_job) == n and set(per_job.values()) == {1}


@pytest.mark.parametrize("url_fixture", ["pg_url", "sqlite_url"])
def test_a_partial_unique_index_does_not_make_the_id_unique(
    url_fixture: str, request: pytest.FixtureRequest, engine_for: Callable[[str], Engine]
) -> None:
    """Unique only among some rows (``… WHERE status = 'running'``): two rows may share an id."""
    url = str(request.getfixturevalue(url_fixture))
    engine = engine_for(url)
    where = text("status = 'running'")
    _jobs_table(
        Index("ix_jobs_job_id", "job_id", unique=True, postgresql_where=where, sqlite_where=where)
    ).create(engine)
    app = make_app(url, sources=[{"table": "jobs", "id": "job_id"}])
    with pytest.raises(ConfigurationError, match="primary key or unique") as info:
        celery_jobreaper.reap(app)
    assert info.value.key == "jobreaper_sources[0].id"


def test_row_reused_by_a_new_run_between_read_and_apply_is_not_settled(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """One row per job, reused by each run (no ``started_at`` mapped): the old run was judged,
    then a new run of the job took the row (new task id, still ``running``) before the apply.
    The compare-and-set re-checks the task id: the new run is not settled, and gets no event."""
    engine = engine_for(db_url)
    table = create_seed(
        engine,
        [{"job_id": "nightly", "task_id": "t-old"}, {"job_id": "b", "task_id": None}],
        task_id=True,
    )
    create_all(engine)
    db = Database(engine, owned=False)
    with engine.connect() as conn:
        source = _source(conn, db_url, task_id="task_id", started_at=None)
        decisions = _decisions(source, conn)
        assert {d.candidate.job_id: d.candidate.task_id for d in decisions} == {
            "b": None,
            "nightly": "t-old",
        }
        with engine_for(db_url).begin() as other:
            other.execute(update(table).where(table.c.job_id == "nightly").values(task_id="t-new"))
        with conn.begin():
            done = settle_batch(
                conn, db, tables, source.target, decisions, now=utcnow(), run_id=None
            )
    assert [d.candidate.job_id for d in done] == ["b"]
    with engine.connect() as conn:
        got = {r.job_id: (r.task_id, r.status) for r in conn.execute(select(table))}
    assert got["nightly"] == ("t-new", "running")
    assert [e.job_id for e in events(engine)] == ["b"]


@pytest.mark.parametrize(
    ("index", "accepted"),
    [
        ("CREATE UNIQUE INDEX ix_jobs_cover ON jobs (job_id) INCLUDE (owner)", True),
        ("CREATE UNIQUE INDEX ix_jobs_other ON jobs (owner) INCLUDE (job_id)", False),
        ("CREATE UNIQUE INDEX ix_jobs_lower ON jobs (lower(job_id))", False),
        ("CREATE UNIQUE INDEX ix_jobs_pair ON jobs (job_id, owner)", False),
    ],
)
def test_postgresql_unique_index_shapes(
    index: str, accepted: bool, pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Only the key columns of a plain unique index count (not INCLUDE columns, not
    expressions, not a pair)."""
    engine = engine_for(pg_url)
    _jobs_table().create(engine)
    with engine.begin() as conn:
        conn.execute(text(index))
    app = make_app(pg_url, sources=[{"table": "jobs", "id": "job_id", "owner": "owner"}])
    if accepted:
        assert celery_jobreaper.reap(app).ok
    else:
        with pytest.raises(ConfigurationError, match="primary key or unique"):
            celery_jobreaper.reap(app)


def test_postgresql_table_in_a_schema_is_checked_there(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Same name in two schemas: the configured schema's table (unique id) is the one checked."""
    engine = engine_for(pg_url)
    with engine.begin() as conn:
        conn.execute(text('CREATE SCHEMA "Other"'))
    _jobs_table().create(engine)  # public.jobs: job_id not unique
    Table(
        "jobs",
        MetaData(schema="Other"),
        Column("job_id", String(64), primary_key=True),
        Column("status", String(16), nullable=False),
    ).create(engine)
    source = {"table": "jobs", "id": "job_id", "schema": "Other"}
    assert celery_jobreaper.reap(make_app(pg_url, sources=[source])).ok
    with pytest.raises(ConfigurationError, match="primary key or unique"):
        celery_jobreaper.reap(make_app(pg_url, sources=[{"table": "jobs", "id": "job_id"}]))
