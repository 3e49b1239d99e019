"""A worker declared dead during a pause comes back: its *new* jobs are not settled on the old
verdict (DESIGN §2.1; issue 6 item 7).

The worker W was paused (SIGSTOP, VM freeze, partition) past ``jobreaper_heartbeat_timeout``;
a reap pinged it, got no reply and marked its incarnation ``dead``. W wakes: its task and its
heartbeat thread resume at the same instant, and the task writes a new job row of a table
without owner column before W's first heartbeat reaches the database. A busy ``-P solo``
worker (or a gevent worker in a CPU task) does not answer pings while it runs a task. A reap
of another process in that window finds no live worker in the incarnations table and no reply
to its ping of every worker: the only signals it has were measured before the job existed.
The row may be failed on "no live worker" only once it is older than the heartbeat timeout: a
live W has heartbeated by then. Stages run as a run does; real databases, no worker (the ping
answers as the busy worker would: not at all).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from support import make_app

from celery_jobreaper import Settings
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation, Liveness
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.rules import NO_LIVE_WORKER_LEFT
from celery_jobreaper.schema import tables
from celery_jobreaper.vocabulary import DEAD


def _reaper(url: str, *, task_id: bool) -> tuple[Reaper, Database]:
    source = {**SEED_SOURCE, **({"task_id": "task_id"} if task_id else {})}
    app = make_app(url, sources=[source])
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    silent = Reaper(  # nobody answers: the woken worker is busy in a -P solo task
        app, settings, db, ping=lambda nodes, timeout: set(), ask=lambda n, ids, t: set()
    )
    silent.prepare_tables()
    return silent, db


def _paused_and_marked_dead(engine: Engine, reaper: Reaper) -> Incarnation:
    """W registered, then silent past the timeout: a reap marks it dead (nothing to settle)."""
    woken = Incarnation.new("woken@h")
    timeout = reaper.settings.heartbeat_timeout
    inc = tables.incarnations
    with engine.begin() as conn:
        Liveness(tables, heartbeat_timeout=timeout).register(conn, woken)
        past = ago(seconds=3 * timeout)
        conn.execute(
            update(inc).where(inc.c.id == woken.id).values(started_at=past, heartbeat_at=past)
        )
    reaper.run("manual")
    with engine.connect() as conn:
        state = conn.execute(select(inc.c.state).where(inc.c.id == woken.id)).scalar_one()
    assert state == DEAD  # the earlier verdict: stale heartbeat, no reply
    return woken


@pytest.mark.parametrize("task_id", [False, True], ids=["seed", "task_id"])
def test_new_ownerless_job_of_a_worker_woken_before_its_heartbeat_is_left_alone(
    db_url: str, engine_for: Callable[[str], Engine], task_id: bool
) -> None:
    engine = engine_for(db_url)
    table = create_seed(engine, [], task_id=task_id)
    reaper, db = _reaper(db_url, task_id=task_id)
    try:
        _paused_and_marked_dead(engine, reaper)
        # W wakes; its task writes a new job (its clock agrees with the database's) before
        # W's first heartbeat lands. Another process reaps now.
        with engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    job_id="new-job",
                    job_type="library_scan",
                    status="running",
                    started_at=ago(seconds=2),
                    **({"task_id": "t-new"} if task_id else {}),
                )
            )
        report = reaper.run("manual")
    finally:
        db.dispose()
    with engine.connect() as conn:
        status = {r.job_id: r.status for r in conn.execute(select(table))}
    assert status["new-job"] == "running", report
    assert report.settled == 0


@pytest.mark.parametrize("task_id", [False, True], ids=["seed", "task_id"])
def test_ownerless_job_older_than_the_timeout_with_nobody_live_is_still_failed(
    db_url: str, engine_for: Callable[[str], Engine], task_id: bool
) -> None:
    """The other side: a row older than the heartbeat timeout, nobody heartbeating or answering
    since (a live runner would have heartbeated since the row appeared): failed as before."""
    engine = engine_for(db_url)
    table = create_seed(engine, [], task_id=task_id)
    reaper, db = _reaper(db_url, task_id=task_id)
    timeout = reaper.settings.heartbeat_timeout
    try:
        _paused_and_marked_dead(engine, reaper)
        with engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    job_id="ghost",
                    job_type="library_scan",
                    status="running",
                    started_at=ago(seconds=timeout + 5),
                    **({"task_id": "t-ghost"} if task_id else {}),
                )
            )
        report = reaper.run("manual")
    finally:
        db.dispose()
    with engine.connect() as conn:
        row = conn.execute(select(table)).one()
    assert row.status == "failed", report
    assert NO_LIVE_WORKER_LEFT in (row.error or "")


def test_new_owner_column_job_of_a_worker_woken_before_its_heartbeat_is_left_alone(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    table = create_seed(engine, [], owner=True)
    app = make_app(sqlite_url, sources=[{**SEED_SOURCE, "owner": "owner"}])
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(
        app, settings, db, ping=lambda nodes, timeout: set(), ask=lambda n, ids, t: set()
    )
    reaper.prepare_tables()
    try:
        woken = _paused_and_marked_dead(engine, reaper)
        with engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    job_id="new-job",
                    job_type="library_scan",
                    status="running",
                    started_at=ago(seconds=2),
                    owner=woken.node,
                )
            )
        report = reaper.run("manual")
    finally:
        db.dispose()
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalar_one() == "running", report
