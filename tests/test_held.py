"""Reaper(held=...): the tasks this process holds protect their rows like a live peer's
(real databases, no worker: ``held`` stands for Celery's in-process worker state)."""

from __future__ import annotations

from collections.abc import Callable

from jobtables import SEED_SOURCE, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import make_app

from celery_jobreaper import Settings
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation
from celery_jobreaper.reaper import Reaper


def _reap(url: str, held: set[str] | None) -> None:
    app = make_app(url, sources=[{**SEED_SOURCE, "task_id": "task_id"}])
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    me = Incarnation.new("me@h")
    reaper = Reaper(
        app,
        settings,
        db,
        me=me,
        ping=lambda nodes, timeout: set(),
        ask=lambda nodes, ids, timeout: set(),
        held=None if held is None else (lambda: set(held)),
    )
    try:
        reaper.run("periodic")
    finally:
        db.dispose()


def test_task_held_here_protects_its_row_and_any_held_task_protects_ownerless_rows(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(db_url)
    table = create_seed(
        engine,
        [
            {"job_id": "held", "task_id": "t-held"},
            {"job_id": "not-held", "task_id": "t-gone"},
            {"job_id": "no-task-id", "task_id": None},
        ],
        task_id=True,
    )

    def status() -> dict[str, str]:
        with engine.connect() as conn:
            return {r.job_id: r.status for r in conn.execute(select(table))}

    _reap(db_url, held={"t-held"})
    # This worker holds a task: the job it holds is protected like a live peer's; a job
    # whose task nobody holds is failed; a job without task id may be the one it runs.
    assert status() == {"held": "running", "not-held": "failed", "no-task-id": "running"}
    _reap(db_url, held=set())  # holds nothing now: no worker at all could be running them
    assert status() == {"held": "failed", "not-held": "failed", "no-task-id": "failed"}


def test_own_owner_only_row_is_left_while_this_worker_holds_tasks_whatever_the_clocks(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Finding A: a table with an owner column but no task-id column. A row of this node name
    whose start (stamped by the writer's clock, which may have stepped back) lies a day before
    this worker's start may be run by one of the tasks this worker holds: left alone. Once it
    holds none, no task of this worker runs it: an earlier start's job, settled at once."""
    engine = engine_for(db_url)
    table = create_seed(engine, [{"job_id": "looks-earlier", "owner": "me@h"}], owner=True)
    app = make_app(db_url, sources=[{**SEED_SOURCE, "owner": "owner"}])
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    me = Incarnation.new("me@h")

    def reap(held: set[str]) -> str:
        Reaper(
            app,
            settings,
            db,
            me=me,
            ping=lambda nodes, timeout: set(),
            ask=lambda nodes, ids, timeout: set(),
            held=lambda: set(held),
        ).run("periodic")
        with engine.connect() as conn:
            return str(conn.execute(select(table.c.status)).scalar())

    try:
        assert reap({"t-busy"}) == "running"
        assert reap(set()) == "failed"
    finally:
        db.dispose()
    with engine.connect() as conn:
        error = conn.execute(select(table.c.error)).scalar()
    assert error is not None and "an earlier start of this worker" in error


def test_own_owner_only_row_older_than_max_age_is_settled_while_this_worker_is_busy(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """The verdict ``jobreaper_max_age`` does not rest on this worker holding nothing: the
    check before the commit (did it take a task meanwhile?) does not undo it."""
    engine = engine_for(db_url)
    table = create_seed(engine, [{"job_id": "ancient", "owner": "me@h"}], owner=True)
    app = make_app(db_url, sources=[{**SEED_SOURCE, "owner": "owner"}], max_age=3600)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    try:
        Reaper(
            app,
            settings,
            db,
            me=Incarnation.new("me@h"),
            ping=lambda nodes, timeout: set(),
            ask=lambda nodes, ids, timeout: set(),
            held=lambda: {"t-busy"},
        ).run("periodic")
    finally:
        db.dispose()
    with engine.connect() as conn:
        row = conn.execute(select(table.c.status, table.c.error)).one()
    assert row.status == "failed" and "jobreaper_max_age" in row.error
