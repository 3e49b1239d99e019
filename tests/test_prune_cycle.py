"""Pruning from the workers' cycle (``jobreaper_prune_interval``): only the worker that leads
the cluster's maintenance prunes; real workers."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from support import WorkerProcess, wait_until, worker_env
from test_prune import _fill_own, _names

from celery_jobreaper.schema import create_all, tables


def _heartbeats(engine: Engine, node: str) -> Any:
    inc = tables.incarnations
    with engine.connect() as conn:
        return conn.execute(select(inc.c.heartbeat_at).where(inc.c.node == node)).scalar()


def test_only_the_leader_prunes_on_its_cycle(
    pg_url: str, engine_for: Callable[[str], Engine], start_worker: Callable[..., WorkerProcess]
) -> None:
    engine = engine_for(pg_url)
    create_all(engine)
    with engine.begin() as conn:
        _fill_own(conn)
        conn.execute(insert(tables.jobs).values(task_id="x", task_name="t", status="running"))
    queue = f"q-{uuid.uuid4().hex[:8]}"
    settings: dict[str, Any] = {"prune_interval": 1, "track_tasks": False}

    follower = start_worker(
        f"follower-{uuid.uuid4().hex[:8]}@jrtest",
        env=worker_env(pg_url, queue, lead=False, **settings),
    )
    follower.wait_for(r"ready\.")
    first = _heartbeats(engine, follower.name)
    # three heartbeats later (one a second), its prune loop has ticked as often: no prune
    wait_until(lambda: _heartbeats(engine, follower.name) > first, 30, "a heartbeat")
    second = _heartbeats(engine, follower.name)
    wait_until(lambda: _heartbeats(engine, follower.name) > second, 30, "a heartbeat")
    with engine.connect() as conn:
        assert {"old-ok", "old-failed", "old-revoked"} <= _names(conn, tables.jobs.c.task_id)
    assert "Pruned" not in follower.output()

    leader = start_worker(
        f"leader-{uuid.uuid4().hex[:8]}@jrtest", env=worker_env(pg_url, queue, **settings)
    )
    leader.wait_for(r"jobreaper: Pruned \d+ finished rows", 60)

    def pruned() -> bool:
        with engine.connect() as conn:
            return not {"old-ok", "old-failed", "old-revoked"} & _names(conn, tables.jobs.c.task_id)

    wait_until(pruned, 30, "the old finished jobs pruned")
    with engine.connect() as conn:
        kept = _names(conn, tables.jobs.c.task_id)
        assert {"new-ok", "x"} <= kept
        assert _names(conn, tables.events.c.job_id) >= {"j1"}
        assert "j40" not in _names(conn, tables.events.c.job_id)
    assert "Pruned" not in follower.output()
