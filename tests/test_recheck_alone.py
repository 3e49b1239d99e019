"""The verdict "no other live worker" is checked again in the apply transaction (§2.1, §4).

A reap judges liveness first, then reads and settles candidates. A worker that registers in
between (and starts consuming, and takes a job of a table without owner column) was not seen
when the reap concluded that no worker could be running such a job: the apply transaction must
see it and leave the job alone. The stages run one after the other here, as a run does:
:meth:`Reaper.assess`, then :meth:`Reaper.run` with that view; real databases, no worker.
On PostgreSQL the seed's table (no owner, no task id) goes through the set-based path
(:mod:`celery_jobreaper.bulk`), the table with a task-id column through the Python path.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from support import make_app

from celery_jobreaper import Settings
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation, Liveness
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import tables


def _reaper(url: str, *, task_id: bool) -> tuple[Reaper, Database]:
    source = {**SEED_SOURCE, **({"task_id": "task_id"} if task_id else {})}
    app = make_app(url, sources=[source])
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    reaper = Reaper(
        app,
        settings,
        db,
        ping=lambda nodes, timeout: set(),
        ask=lambda nodes, ids, timeout: set(),
    )
    return reaper, db


@pytest.mark.parametrize("task_id", [False, True], ids=["seed", "task_id"])
def test_worker_registered_between_assess_and_apply_keeps_its_ownerless_job(
    db_url: str, engine_for: Callable[[str], Engine], task_id: bool
) -> None:
    engine = engine_for(db_url)
    table = create_seed(engine, [{"job_id": "ghost", "task_id": "t-ghost"}], task_id=task_id)
    reaper, db = _reaper(db_url, task_id=task_id)
    try:
        view = reaper.assess()
        assert view.other_live_workers == 0  # nobody else: ownerless jobs are stale
        # A peer starts now: it registers, consumes, and its task marks a job running.
        peer = Incarnation.new("peer@h")
        with engine.begin() as conn:
            Liveness(tables, heartbeat_timeout=reaper.settings.heartbeat_timeout).register(
                conn, peer
            )
            row = {"job_id": "peer-job", "job_type": "library_scan", "status": "running"}
            conn.execute(
                insert(table).values(
                    **row,
                    started_at=ago(seconds=5),
                    **({"task_id": "t-peer"} if task_id else {}),
                )
            )
        report = reaper.run("manual", view=view)
    finally:
        db.dispose()
    with engine.connect() as conn:
        status = {r.job_id: r.status for r in conn.execute(select(table))}
    assert status["peer-job"] == "running", report
    # the job nobody ran when the reap began is not settled by this run either: the verdict
    # it relied on no longer holds; the next run judges it again (the peer may run it now)
    assert status["ghost"] == "running"
    assert report.left_alone
