"""A job whose message still waits in the broker is not a ghost (DESIGN §2.1, §2.6).

A lone busy worker (its prefetch full) reaps a table without owner but with a task id: a row
whose message waits in a queue must stay, and its message with it. On Redis the waiting
message is found in any bound queue (not only this worker's); on RabbitMQ queues cannot be
read, so such a row is left alone, while a dead owner's job is still settled.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from jobtables import SEED_SOURCE, ago, create_seed
from kombu import Queue
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import AMQP_URL, REDIS_URL, make_app

from celery_jobreaper import Settings
from celery_jobreaper.batchplan import QUEUES_UNREAD
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation, Liveness
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.report import Report
from celery_jobreaper.schema import tables
from celery_jobreaper.sweep import BrokerSweep

WITH_TASK_ID = {**SEED_SOURCE, "task_id": "task_id", "owner": "owner"}


@pytest.fixture
def queue() -> str:
    return f"jrw-{uuid.uuid4().hex[:10]}"


def _app(db_url: str, broker: str, queue: str) -> Celery:
    app = make_app(db_url, sources=[WITH_TASK_ID])
    app.conf.broker_url = broker
    app.conf.task_default_queue = queue
    return app


def _reap(app: Celery, engine: Engine, consumed: str) -> Report:
    """One periodic reap by a lone worker that holds another task and consumes *consumed*."""
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    me = Incarnation.new("me@h")
    sweep = BrokerSweep(app, settings, db, tables, lambda: [consumed])
    reaper = Reaper(
        app,
        settings,
        db,
        me=me,
        ping=lambda nodes, timeout: set(),
        ask=lambda nodes, ids, timeout: set(),
        held=lambda: {"another-running-task"},
        sweep=sweep,
    )
    try:
        reaper.prepare_tables()
        with engine.begin() as conn:
            Liveness(tables, heartbeat_timeout=60).register(conn, me)
        return reaper.run("periodic")
    finally:
        db.dispose()


@pytest.fixture
def declared(queue: str) -> Iterator[Callable[[Celery], None]]:
    apps: list[Celery] = []

    def declare(app: Celery) -> None:
        apps.append(app)
        with app.connection_for_write() as conn:
            Queue(queue, routing_key=queue).bind(conn.default_channel).declare()

    yield declare
    for app in apps:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def _waiting(app: Celery, queue: str) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


@pytest.mark.xdist_group("rabbitmq")  # one vhost: its broadcasts reach every worker on it
@pytest.mark.parametrize(
    ("broker", "consumed_here"),
    [("amqp", True), ("redis", True), ("redis", False)],
    ids=["rabbitmq-own-queue", "redis-own-queue", "redis-another-workers-queue"],
)
def test_a_row_whose_message_waits_is_left_alone_with_its_message(
    broker: str,
    consumed_here: bool,
    sqlite_url: str,
    engine_for: Callable[[str], Engine],
    queue: str,
    declared: Callable[[Celery], None],
) -> None:
    engine = engine_for(sqlite_url)
    task_id = str(uuid.uuid4())
    row = {"job_id": "waiting", "status": "scheduled", "task_id": task_id}
    table = create_seed(engine, [{**row, "started_at": ago(minutes=10)}], task_id=True, owner=True)
    app = _app(sqlite_url, AMQP_URL if broker == "amqp" else REDIS_URL, queue)
    declared(app)
    app.send_task("some.task", task_id=task_id, queue=queue)  # waits: the prefetch is full
    report = _reap(app, engine, queue if consumed_here else f"{queue}-other")
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalar_one() == "scheduled"
    assert report.settled == 0
    assert _waiting(app, queue) == 1
    if broker == "amqp":
        assert report.left_alone[QUEUES_UNREAD] == 1


@pytest.mark.xdist_group("rabbitmq")  # one vhost: its broadcasts reach every worker on it
def test_on_rabbitmq_a_dead_owners_job_is_still_settled(
    sqlite_url: str,
    engine_for: Callable[[str], Engine],
    queue: str,
    declared: Callable[[Celery], None],
) -> None:
    """Queues unread on RabbitMQ: only jobs whose failure rests on "not queued" wait."""
    engine = engine_for(sqlite_url)
    rows: list[dict[str, Any]] = [
        {"job_id": "ghost", "task_id": str(uuid.uuid4()), "owner": "gone@h"},
    ]
    table = create_seed(engine, rows, task_id=True, owner=True)
    app = _app(sqlite_url, AMQP_URL, queue)
    declared(app)
    report = _reap(app, engine, queue)
    with engine.connect() as conn:
        status = conn.execute(select(table.c.status)).scalar_one()
    # gone@h never registered and answers no ping: dead on two signals, its day-old job
    # settled although the queues could not be read
    assert (status, report.settled) == ("failed", 1)
