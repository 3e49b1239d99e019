"""Pruning on PostgreSQL, MariaDB and SQLite: only finished rows past their retention go."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from support import make_app
from test_cli import jobreaper

import celery_jobreaper
from celery_jobreaper import ConfigurationError, Settings
from celery_jobreaper.database import Database
from celery_jobreaper.prune import Pruner, PruneTarget, own_targets
from celery_jobreaper.schema import create_all, tables

DAY = 86400.0
OPTED_IN = {**SEED_SOURCE, "prune_after": 7 * DAY, "prune_statuses": ["completed", "failed"]}


def _job(task_id: str, status: str, *, days: float, done: bool = True) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_name": "t",
        "status": status,
        "incarnation_id": "gone",
        "node": "old@h",
        "started_at": ago(days=days + 0.01),
        "completed_at": ago(days=days) if done else None,
        "times_reaped": 0,
    }


def _fill_own(conn: Connection) -> None:
    conn.execute(
        insert(tables.jobs),
        [
            _job("old-ok", "succeeded", days=40),
            _job("old-failed", "failed", days=40),
            _job("old-revoked", "revoked", days=40),
            _job("old-running", "running", days=40, done=False),  # never pruned
            _job("old-retry", "retry", days=40, done=False),  # never pruned
            _job("new-ok", "succeeded", days=1),
        ],
    )
    for days in (40, 35, 1):
        run = conn.execute(
            insert(tables.runs).values(trigger="periodic", dry_run=False, started_at=ago(days=days))
        ).inserted_primary_key[0]
        conn.execute(
            insert(tables.events).values(
                run_id=run, at=ago(days=days), source="s", job_id=f"j{days}", action="settled"
            )
        )


def _names(conn: Connection, column: Any) -> set[Any]:
    return set(conn.execute(select(column)).scalars())


def test_only_finished_rows_past_their_retention_are_pruned(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(db_url)
    create_all(engine)
    seed = create_seed(
        engine,
        [
            {"job_id": "done-old", "status": "completed", "completed_at": ago(days=10)},
            {"job_id": "failed-old", "status": "failed", "completed_at": ago(days=8)},
            {"job_id": "running-old", "started_at": ago(days=30)},  # a stale status: never
            {"job_id": "done-new", "status": "completed", "completed_at": ago(days=2)},
            {"job_id": "other-old", "status": "cancelled", "completed_at": ago(days=30)},
        ],
    )
    with engine.begin() as conn:
        _fill_own(conn)
    app = make_app(db_url, sources=[OPTED_IN])

    dry = celery_jobreaper.prune(app, dry_run=True)
    assert dry.dry_run and dry.total == 9 and not dry.partial
    assert dry.deleted == {
        "jobreaper_jobs": 3,
        "jobreaper_runs": 2,
        "jobreaper_events": 2,
        "jobreaper_late_writes": 0,
        "system_jobs": 2,
    }
    with engine.connect() as conn:
        assert len(_names(conn, tables.jobs.c.task_id)) == 6  # nothing deleted

    result = celery_jobreaper.prune(app)
    assert result.deleted == dry.deleted
    with engine.connect() as conn:
        assert _names(conn, tables.jobs.c.task_id) == {"old-running", "old-retry", "new-ok"}
        assert _names(conn, tables.events.c.job_id) == {"j1"}
        assert conn.execute(select(func.count()).select_from(tables.runs)).scalar() == 1
        assert _names(conn, seed.c.job_id) == {"running-old", "done-new", "other-old"}
    assert celery_jobreaper.prune(app).total == 0


def test_retention_none_keeps_own_tables_and_older_than_overrides_it(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    create_all(engine)
    with engine.begin() as conn:
        _fill_own(conn)
    assert celery_jobreaper.prune(make_app(sqlite_url, retention=None)).total == 0
    assert celery_jobreaper.prune(make_app(sqlite_url), older_than=37 * DAY).deleted == {
        "jobreaper_jobs": 3,
        "jobreaper_runs": 1,
        "jobreaper_events": 1,
        "jobreaper_late_writes": 0,
    }


def test_max_rows_bounds_one_prune_and_the_next_goes_on(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg_url)
    create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(tables.events),
            [
                {"at": ago(days=60), "source": "s", "job_id": f"j{i}", "action": "x"}
                for i in range(12)
            ],
        )
    app = make_app(pg_url, prune_max_rows=5, batch_size=2)
    first, second, third = (celery_jobreaper.prune(app) for _ in range(3))
    assert (first.total, first.partial) == (5, True)
    assert (second.total, second.partial) == (5, True)
    assert (third.total, third.partial) == (2, False)


class _RestartsARowMidBatch(Pruner):
    """Between reading a batch's keys and deleting them, one of those jobs starts again."""

    def __init__(self, *args: Any, engine: Engine, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.engine = engine

    def _keys(  # type: ignore[override]
        self, conn: Connection, target: PruneTarget, cut: datetime, after: Any, limit: int
    ) -> list[Any]:
        found = Pruner._keys(conn, target, cut, after, limit)
        if "old-ok" in found:
            with self.engine.begin() as other:  # another connection: a worker retrying it
                other.execute(
                    update(tables.jobs)
                    .where(tables.jobs.c.task_id == "old-ok")
                    .values(status="running", completed_at=None)
                )
        return found


def test_a_job_that_starts_again_between_read_and_delete_stays(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg_url)
    create_all(engine)
    with engine.begin() as conn:
        _fill_own(conn)
    settings = Settings.from_app(make_app(pg_url))
    db = Database.from_settings(settings)
    try:
        pruner = _RestartsARowMidBatch(
            db, own_targets(tables, 30 * DAY)[:1], batch=100, max_rows=100, engine=engine
        )
        result = pruner.run()
    finally:
        db.dispose()
    assert result.deleted == {"jobreaper_jobs": 2}  # old-failed, old-revoked; not old-ok
    with engine.connect() as conn:
        assert "old-ok" in _names(conn, tables.jobs.c.task_id)


def test_pruning_100k_rows_while_a_reap_runs(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """A prune and a reap at once: every old row goes, every stale job is settled once."""
    n, stale = 100_000, 2_000
    engine = engine_for(pg_url)
    create_all(engine)
    seed = create_seed(engine, [{"job_id": f"stale-{i}"} for i in range(stale)])
    with engine.begin() as conn:
        for start in range(0, n, 10_000):
            conn.execute(
                insert(tables.jobs),
                [_job(f"old-{i}", "succeeded", days=40) for i in range(start, start + 10_000)],
            )
    app = make_app(pg_url, batch_size=500)
    errors: list[BaseException] = []
    pruned: list[Any] = []

    def prune() -> None:
        try:
            pruned.append(celery_jobreaper.prune(app))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=prune)
    thread.start()
    report = celery_jobreaper.reap(app)
    thread.join(timeout=300)
    assert not errors and pruned[0].deleted["jobreaper_jobs"] == n
    assert report.settled == stale
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tables.jobs)).scalar() == 0
        failed = select(func.count()).where(seed.c.status == "failed")
        assert conn.execute(failed).scalar() == stale
        per_job = conn.execute(
            select(func.count())
            .select_from(tables.events)
            .where(tables.events.c.source == "system_jobs")
        ).scalar()
    assert per_job == stale


@pytest.mark.parametrize(
    ("extra", "key", "needs"),
    [
        ({"prune_after": DAY}, "prune_statuses", "finished statuses"),
        ({"prune_after": DAY, "prune_statuses": ["running"]}, "prune_statuses", "never deleted"),
        ({"prune_statuses": ["completed"]}, "prune_statuses", "set prune_after"),
        ({"prune_after": -1, "prune_statuses": ["completed"]}, "prune_after", "positive"),
    ],
)
def test_bad_prune_settings_name_the_key(extra: dict[str, Any], key: str, needs: str) -> None:
    app = make_app("sqlite://", sources=[{**SEED_SOURCE, **extra}])
    with pytest.raises(ConfigurationError, match=rf"jobreaper_sources\[0\]\.{key}.*{needs}"):
        Settings.from_app(app)


def test_prune_after_needs_the_completed_at_column() -> None:
    source = {k: v for k, v in OPTED_IN.items() if k != "completed_at"}
    with pytest.raises(ConfigurationError, match=r"prune_after.*completed_at"):
        Settings.from_app(make_app("sqlite://", sources=[source]))


def test_cli_prune_dry_run_then_for_real(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    create_all(engine)
    with engine.begin() as conn:
        _fill_own(conn)
    dry = jobreaper(sqlite_url, "prune", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["total"] == 7 and json.loads(dry.stdout)["dry_run"] is True
    text = jobreaper(sqlite_url, "prune")
    assert text.returncode == 0, text.stderr
    assert "deleted 7 row(s)" in text.stdout and "jobreaper_events" in text.stdout
    again = jobreaper(sqlite_url, "prune", "--json")
    assert json.loads(again.stdout)["total"] == 0
    missing = jobreaper(sqlite_url, "prune", settings={"sources": [{**OPTED_IN, "table": "nope"}]})
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_settled_events_and_late_write_marks_outlive_a_short_retention(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Late writes are found through settled events (and recorded once through their
    marks) for jobreaper_late_write_window seconds: a shorter retention keeps both."""
    engine = engine_for(sqlite_url)
    create_all(engine)
    with engine.begin() as conn:
        for action, hours in (("settled", 2), ("removed", 2), ("settled", 4)):
            conn.execute(
                insert(tables.events).values(
                    at=ago(hours=hours), source="s", job_id=f"{action}-{hours}", action=action
                )
            )
        conn.execute(insert(tables.late_writes).values(event_id=1, detected_at=ago(hours=2)))
        conn.execute(insert(tables.late_writes).values(event_id=3, detected_at=ago(hours=4)))
    app = make_app(sqlite_url, late_write_window=3 * 3600)
    result = celery_jobreaper.prune(app, older_than=3600)
    assert result.deleted["jobreaper_events"] == 2  # removed-2 and settled-4
    assert result.deleted["jobreaper_late_writes"] == 1
    with engine.connect() as conn:
        assert _names(conn, tables.events.c.job_id) == {"settled-2"}
        assert _names(conn, tables.late_writes.c.event_id) == {1}


def test_a_late_write_is_found_after_a_prune_shorter_than_its_window(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    table = create_seed(engine, [{"job_id": "j1"}])
    app = make_app(sqlite_url)
    assert celery_jobreaper.reap(app).settled == 1
    assert celery_jobreaper.prune(app, older_than=0.001).deleted["jobreaper_events"] == 0
    with engine.begin() as conn:  # the old owner wakes up and writes its result
        conn.execute(update(table).values(status="completed"))
    celery_jobreaper.reap(app)
    with engine.connect() as conn:
        actions = sorted(conn.execute(select(tables.events.c.action)).scalars())
    assert actions == ["late_write", "settled"]
