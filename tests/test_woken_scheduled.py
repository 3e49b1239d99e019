"""Adversarial review (h-review): the woken-worker guard of the "no live worker" rule ages a
job by its ``started_at``; a job whose start is NULL is still failed at once. The seed's own
table has such jobs: ``scheduled`` is a stale status and a scheduled job has not started yet.
A worker woken from a pause (marked dead meanwhile; busy ``-P solo``, no reply) that schedules
a job before its first heartbeat lands gets that new job failed while it is alive (DESIGN
§2.1) — the case the guard was added for, with the other of the seed's two stale statuses.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from jobtables import create_seed
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from test_woken_worker import _paused_and_marked_dead, _reaper


@pytest.mark.xfail(
    strict=True,
    reason="review finding: an ownerless job with started_at NULL (a 'scheduled' job) is "
    "failed on 'no live worker' at once, with no heartbeat-timeout guard: a woken worker's "
    "new scheduled job is failed while the worker is alive",
)
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
