"""Concurrent reapers settle each job exactly once; a fault mid-apply leaves no half-settled job."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from jobtables import create_seed
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.engine import Engine
from support import make_app

import celery_jobreaper
from celery_jobreaper import signals
from celery_jobreaper.clock import utcnow
from celery_jobreaper.report import Report
from celery_jobreaper.schema import tables


def fill(engine: Engine, n: int) -> Any:
    table = create_seed(engine, [], int_ids=True)
    # older than the heartbeat timeout: "no live worker" fails only such rows (a worker woken
    # from a pause may be running a younger one before its first heartbeat)
    started = utcnow() - timedelta(days=1)
    rows = [
        {
            "job_id": i,
            "job_type": f"kind{i % 7}",
            "status": "running" if i % 2 else "done",
            "started_at": started,
        }
        for i in range(2 * n)
    ]
    with engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(insert(table), rows[i : i + 5000])
    return table


@pytest.mark.parametrize(
    ("db", "n"), [("pg_url", 10_000), ("mysql_url", 3_000), ("sqlite_url", 3_000)]
)
def test_four_concurrent_reapers_settle_each_job_once(
    db: str, n: int, request: pytest.FixtureRequest, engine_for: Callable[[str], Engine]
) -> None:
    url = str(request.getfixturevalue(db))
    engine = engine_for(url)
    table = fill(engine, n)
    celery_jobreaper.schema.create_all(engine)
    barrier = threading.Barrier(4)
    reports: list[Report] = []
    errors: list[BaseException] = []

    def reaper() -> None:
        try:
            barrier.wait()
            reports.append(celery_jobreaper.reap(make_app(url, batch_size=500)))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=reaper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert sum(r.settled for r in reports) == n
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(table.c.status == "failed")).scalar() == n
        assert conn.execute(select(func.count()).where(table.c.status == "done")).scalar() == n
        per_job = conn.execute(
            select(tables.events.c.job_id, func.count()).group_by(tables.events.c.job_id)
        ).all()
    assert len(per_job) == n and {c for _, c in per_job} == {1}


def test_connection_dropped_mid_apply_leaves_no_half_settled_job(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """The reaper's connection is terminated between a batch's UPDATE and its ledger INSERT."""
    n, batch = 2_000, 200
    engine = engine_for(pg_url)
    table = fill(engine, n)
    app = make_app(
        pg_url, batch_size=batch, engine_options={"connect_args": {"application_name": "jr-victim"}}
    )
    admin = engine_for(pg_url)
    updates = {"count": 0}

    @event.listens_for(Engine, "after_cursor_execute")
    def drop(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "UPDATE system_jobs" in statement:
            updates["count"] += 1
            if updates["count"] == 4:  # after three committed batches
                with admin.connect() as c:
                    c.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'jr-victim'"
                        )
                    )

    try:
        with pytest.raises(Exception, match=r"terminat|closed|server"):
            celery_jobreaper.reap(app)
    finally:
        event.remove(Engine, "after_cursor_execute", drop)

    def consistent() -> tuple[int, int]:
        with engine.connect() as conn:
            failed = conn.execute(select(table).where(table.c.status == "failed")).all()
            evented = set(conn.execute(select(tables.events.c.job_id)).scalars())
            half = conn.execute(
                select(func.count()).where(table.c.status == "running", table.c.error.is_not(None))
            ).scalar()
        assert half == 0
        assert all(r.completed_at is not None and "Job reset" in r.error for r in failed)
        assert {str(r.job_id) for r in failed} == evented  # status and event together, or neither
        return len(failed), len(evented)

    assert consistent() == (3 * batch, 3 * batch)
    with engine.connect() as conn:
        run = conn.execute(select(tables.runs)).one()
    assert run.error is not None and run.settled == 3 * batch

    settled: list[int] = []
    signals.jobs_settled.connect(
        lambda sender, decisions, **_: settled.append(len(decisions)),
        weak=False,
        dispatch_uid="test-count",
    )
    try:
        report = celery_jobreaper.reap(app)
    finally:
        signals.jobs_settled.disconnect(dispatch_uid="test-count")
    assert report.settled == n - 3 * batch and sum(settled) == report.settled
    assert consistent() == (n, n)
