"""A settled job's task is revoked in the settle's own transaction (issue 6, item 9b)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import make_app

import celery_jobreaper
from celery_jobreaper.revoked import SETTLED_NODE
from celery_jobreaper.schema import tables


@pytest.mark.parametrize("cleanup", ["off", "purge"])
def test_settled_task_id_is_revoked_whatever_the_queue_cleanup(
    db_url: str, cleanup: str, engine_for: Callable[[str], Engine]
) -> None:
    """With the broker sweep off (or purge, outside startup) the id is still stored."""
    engine = engine_for(db_url)
    source = {**SEED_SOURCE, "owner": "owner", "task_id": "task_id"}
    create_seed(
        engine,
        [
            {"job_id": "dead-job", "owner": "dead@h", "task_id": "t-dead"},
            {"job_id": "other", "owner": "dead@h", "task_id": None},
        ],
        owner=True,
        task_id=True,
    )
    celery_jobreaper.schema.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            tables.incarnations.insert().values(
                id="d" * 32,
                node="dead@h",
                host="h",
                pid=1,
                started_at=ago(hours=1),
                heartbeat_at=ago(minutes=10),
                state="running",
            )
        )
    app = make_app(db_url, sources=[source], queue_cleanup=cleanup)

    report = celery_jobreaper.reap(app)

    assert report.settled == 2
    with engine.connect() as conn:
        stored = conn.execute(select(tables.revoked.c.task_id, tables.revoked.c.node)).all()
    assert [tuple(row) for row in stored] == [("t-dead", SETTLED_NODE)]
