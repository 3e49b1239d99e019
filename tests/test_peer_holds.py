"""A task a live peer holds protects its job row, however the peer holds it.

Before settling a job with a task id, the reaper asks the live peers whether they hold that
task. Celery's ``query_task`` sees only ``worker_state.requests``: not a rate-limited request
waiting in the consumer's token bucket (any Celery), nor an ETA/countdown request waiting on
the worker's timer (Celery < 5.7). Here a real peer worker holds the task both ways while a
reap from another process judges a dead node's row with that task id.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import kombu
import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from support import WorkerProcess, make_app, wait_until, worker_env

import celery_jobreaper
from celery_jobreaper.peers import PeersUnsure, ask_with
from celery_jobreaper.schema import tables

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("held_as", ["rate_limited", "eta"])
def test_task_held_by_a_live_peer_protects_its_row(
    held_as: str,
    pg_url: str,
    prefix: str,
    unique: str,
    tmp_path: Path,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    queue, dead = f"hbrk-{unique}", f"hbrk-dead-{unique}@h"
    source = {**SEED_SOURCE, "owner": "owner", "task_id": "task_id"}
    table = create_seed(engine, [], owner=True, task_id=True)
    celery_jobreaper.schema.create_all(engine)
    env = {**worker_env(pg_url, queue, sources=[source], enabled=False), "JR_KEYPREFIX": prefix}
    peer = start_worker(f"hbrk-peer-{unique}@h", env=env)
    peer.wait_for(r" ready\.")

    app = make_app(pg_url, sources=[source], queue_cleanup="off", ping_timeout=1.0)
    app.conf.update(
        task_default_queue=queue,
        task_queues=[kombu.Queue(queue, routing_key=queue)],
        broker_transport_options={"global_keyprefix": prefix},
    )
    held = str(uuid.uuid4())
    if held_as == "rate_limited":  # one a minute: the second waits in the token bucket
        app.send_task("jr.limited", args=("first",), queue=queue)
        wait_until((tmp_path / "finished-first").exists, 60, "the first to run")
        app.send_task("jr.limited", args=("second",), queue=queue, task_id=held)
        peer.wait_for(rf"Task jr\.limited\[{held}\] received")
    else:  # waits on the peer's timer for five minutes
        app.send_task("jr.sleep", args=(0,), queue=queue, task_id=held, countdown=300)
        peer.wait_for(rf"Task jr\.sleep\[{held}\] received")

    with engine.begin() as conn:
        conn.execute(
            tables.incarnations.insert().values(
                id="d" * 32,
                node=dead,
                host="h",
                pid=1,
                started_at=ago(hours=1),
                heartbeat_at=ago(minutes=10),
                state="running",
            )
        )
        conn.execute(
            insert(table),
            [
                {
                    "job_id": job_id,
                    "job_type": "t",
                    "status": "running",
                    "started_at": ago(hours=1),
                    "owner": dead,
                    "task_id": task_id,
                }
                for job_id, task_id in (("held", held), ("gone", str(uuid.uuid4())))
            ],
        )

    report = celery_jobreaper.reap(app)

    with engine.connect() as conn:
        status = {r.job_id: r.status for r in conn.execute(select(table))}
    # the dead node's other job is settled: the peer answered, it holds only the first
    assert status == {"held": "running", "gone": "failed"}, report
    app.close()


def test_a_peer_without_jobreaper_means_dont_know(
    pg_url: str, prefix: str, unique: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A live worker that cannot answer jobreaper's question (not installed there) is not
    "holds nothing": the ask raises, and the reaper leaves the jobs alone that time."""
    queue, name = f"hbrk-{unique}", f"hbrk-plain-{unique}@h"
    env = {**worker_env(pg_url, queue), "JR_KEYPREFIX": prefix, "JR_NO_INSTALL": "1"}
    plain = start_worker(name, env=env)
    plain.wait_for(r" ready\.")
    app = make_app(pg_url)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}

    with pytest.raises(PeersUnsure, match="hbrk-plain"):
        ask_with(app)([name], [str(uuid.uuid4())], 1.0)
    app.close()
