"""A settled job's task id is forgotten (un-revoked) only once its message is gone everywhere.

The sweep revokes a settled job's task id (so its message never runs later) and un-revokes it
once the message is gone, so that apps reusing deterministic task ids are not blocked for
``jobreaper_revoked_expires``. "Gone" must mean looked for in every place the message could
be, not only in the queues the reaping worker consumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kombu
import redis
from celery import Celery
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, make_app

import celery_jobreaper
from celery_jobreaper import signals
from celery_jobreaper.revoked import SETTLED_NODE
from celery_jobreaper.schema import tables


def _dead_owner_row(engine: Engine, task_id: str) -> dict[str, Any]:
    """A running row of a dead worker with *task_id*; return the source for it."""
    source = {**SEED_SOURCE, "owner": "owner", "task_id": "task_id"}
    create_seed(
        engine,
        [{"job_id": "dead-job", "owner": "dead@h", "task_id": task_id}],
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
    return source


def _app(url: str, prefix: str, queue: str, **conf: Any) -> Celery:
    app = make_app(url, **conf)
    app.conf.update(
        task_default_queue=queue,
        task_queues=[kombu.Queue(queue, routing_key=queue)],
        broker_transport_options={"global_keyprefix": prefix},
    )
    return app


def _revoked(engine: Engine, task_id: str) -> list[str | None]:
    """The ``node`` of *task_id*'s revoked rows (other tests' ids may be there too)."""
    t = tables.revoked
    with engine.connect() as conn:
        return list(conn.execute(select(t.c.node).where(t.c.task_id == task_id)).scalars())


def test_settled_message_in_a_queue_the_reaper_does_not_read_stays_revoked(
    pg_url: str, prefix: str, unique: str, engine_for: Callable[[str], Engine]
) -> None:
    """A settled job's message turns up in queue B while the reap runs (published after its
    queues were read, before its sweep: a message in flight); the reaper reads only queue A.
    The id stays revoked (else the message would run later); a reaper that reads B removes
    the message, and then the id is forgotten. (A message already waiting in a bound queue
    keeps its job from being settled at all: see test_waiting_messages.py.)"""
    engine = engine_for(pg_url)
    task_id = f"hbrk-t-{unique}"
    queue_a, queue_b = f"hbrk-a-{unique}", f"hbrk-b-{unique}"
    source = _dead_owner_row(engine, task_id)
    sender = _app(pg_url, prefix, queue_b)
    client = redis.Redis.from_url(REDIS_URL)

    def in_flight(**_: Any) -> None:  # after the batch commits, before the sweep
        sender.send_task("jr.sleep", args=(0,), queue=queue_b, task_id=task_id)

    reaper_a = _app(pg_url, prefix, queue_a, sources=[source])
    signals.jobs_settled.connect(in_flight)
    try:
        report = celery_jobreaper.reap(reaper_a)
    finally:
        signals.jobs_settled.disconnect(in_flight)

    assert report.settled == 1
    assert client.llen(f"{prefix}{queue_b}") == 1  # not this reaper's queue: left there
    assert _revoked(engine, task_id) == [SETTLED_NODE]  # so it must stay revoked

    reaper_b = _app(pg_url, prefix, queue_b, sources=[source])
    report = celery_jobreaper.reap(reaper_b)

    assert report.broker["removed"] == 1
    assert client.llen(f"{prefix}{queue_b}") == 0
    assert _revoked(engine, task_id) == []  # gone everywhere now: forgotten
    for app in (sender, reaper_a, reaper_b):
        app.close()
    client.close()
