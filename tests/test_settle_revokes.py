"""A settled job's task is revoked in the settle's own transaction (issue 6, item 9b)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, WorkerProcess, make_app, wait_until, worker_env

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


def test_deterministic_task_id_runs_again_after_its_run_was_settled(
    pg_url: str,
    prefix: str,
    unique: str,
    tmp_path: Path,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """A task id reused on purpose: its first run dies with its worker and is settled; once
    that run's message is gone the id is no longer revoked, and sent again it runs."""
    queue, node, task_id = f"q-{unique}", f"det-{unique}@h", f"det-{unique}"
    env = {**worker_env(pg_url, queue), "JR_KEYPREFIX": prefix}
    first = start_worker(node, env=env)
    first.wait_for(r" ready\.")
    app = Celery("sender", broker=REDIS_URL, set_as_current=False)
    app.conf.update(task_default_queue=queue, broker_transport_options={"global_keyprefix": prefix})
    app.send_task("jr.sleep", args=(120,), kwargs={"tag": "run1"}, queue=queue, task_id=task_id)
    wait_until((tmp_path / "started-run1").exists, 60, "the first run to start")
    jobs = engine_for(pg_url)
    row = select(tables.jobs.c.status).where(tables.jobs.c.task_id == task_id)
    with jobs.connect() as conn:
        wait_until(lambda: conn.execute(row).first(), 10, "the tracked row")
    first.kill()

    second = start_worker(node, env=env)  # its earlier self is dead at once: settled
    second.wait_for(r" ready\.")
    with jobs.connect() as conn:
        assert conn.execute(row).scalar() == "failed"
    app.send_task("jr.sleep", args=(0,), kwargs={"tag": "run2"}, queue=queue, task_id=task_id)
    wait_until((tmp_path / "finished-run2").exists, 60, "the id sent again to run")
    with jobs.connect() as conn:
        left = conn.execute(select(tables.revoked.c.task_id)).scalars().all()
    assert task_id not in left
    app.close()
