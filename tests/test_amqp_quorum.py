"""RabbitMQ quorum queues: sweeps never burn the delivery limit; a dry run touches nothing.

On a quorum queue each message a sweep takes and hands back counts as a delivery
(``x-delivery-count``); past the queue's ``delivery-limit`` RabbitMQ dead-letters it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
from celery import Celery
from support import AMQP_URL, wait_until

import celery_jobreaper
from celery_jobreaper.broker.amqp import Hold, sweep_queues

# one RabbitMQ vhost for every test process: its broadcasts reach every worker on it
pytestmark = pytest.mark.xdist_group("rabbitmq")


@pytest.fixture
def names(unique: str) -> Iterator[tuple[str, str]]:
    """A quorum queue (delivery limit 3, dead-lettered to a queue of its own) and that queue."""
    queue, dead = f"qq-{unique}", f"dlq-{unique}"
    yield queue, dead
    with kombu.Connection(AMQP_URL) as conn:
        channel: Any = conn.channel()
        for name in (queue, dead):
            channel.queue_delete(name)
        channel.exchange_delete(queue)
        channel.close()


def _app(db_url: str, queue: str, dead: str, **jobreaper: Any) -> Celery:
    app = Celery("quorum", broker=AMQP_URL, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_queues=[
            kombu.Queue(
                queue,
                routing_key=queue,
                queue_arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": 3,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": dead,
                },
            )
        ],
        broker_transport_options={"confirm_publish": True},
        jobreaper_database_url=db_url,
        jobreaper_track_tasks=False,
    )
    for key, value in jobreaper.items():
        app.conf[f"jobreaper_{key}"] = value
    return app


def _fill(app: Celery, dead: str, count: int) -> list[str]:
    with kombu.Connection(AMQP_URL) as conn:
        kombu.Queue(dead, routing_key=dead).bind(conn.default_channel).declare()
    with app.producer_or_acquire() as producer:
        return [
            str(app.send_task("jr.sleep", args=(0,), producer=producer).id) for _ in range(count)
        ]


def _drain(queue: str) -> list[tuple[str, int]]:
    """Take every message off *queue* (auto-ack): (task id, x-delivery-count) in order."""
    out = []
    with kombu.Connection(AMQP_URL) as conn:
        channel: Any = conn.channel()
        while (raw := channel.basic_get(queue=queue, no_ack=True)) is not None:
            headers = raw.properties.get("application_headers") or {}
            out.append((str(headers.get("id")), int(headers.get("x-delivery-count") or 0)))
        channel.close()
    return out


def test_dry_run_plan_never_touches_a_quorum_queue(pg_url: str, names: tuple[str, str]) -> None:
    queue, dead = names
    app = _app(pg_url, queue, dead)
    ids = _fill(app, dead, 5)
    celery_jobreaper.revoke(app, [ids[2]])

    for _ in range(2):
        celery_jobreaper.reap(app, dry_run=True)

    assert _drain(queue) == [(i, 0) for i in ids]  # all there, never delivered
    app.close()


def test_quorum_queue_swept_more_times_than_its_delivery_limit(
    pg_url: str, names: tuple[str, str]
) -> None:
    """Eight sweeps, each with a new revoked id, of a queue whose limit is 3: the revoked
    message in it goes, nothing is dead-lettered, every other message is still there."""
    queue, dead = names
    app = _app(pg_url, queue, dead, amqp_max_deliveries=2)
    ids = _fill(app, dead, 10)
    celery_jobreaper.revoke(app, [ids[9]])

    for round_ in range(8):
        report = celery_jobreaper.reap(app)
        assert not report.broker.get("errors"), report.broker
        if round_ == 0:
            assert report.broker["removed"] == 1
        celery_jobreaper.revoke(app, [str(uuid.uuid4())])  # new, not in the queue

    assert _drain(dead) == []
    with kombu.Connection(AMQP_URL) as conn:
        channel = conn.channel()
        wait_until(
            lambda: channel.queue_declare(queue=queue, passive=True).message_count == 9,
            30,
            "the messages to be back",
        )
        channel.close()
    left = _drain(queue)
    # (RabbitMQ 3.x takes the message the sweep stopped at back at the tail.)
    assert sorted(task_id for task_id, _ in left) == sorted(ids[:9])
    assert max(count for _, count in left) <= 3
    app.close()


def test_a_partial_sweep_does_not_start_over_from_the_head(unique: str) -> None:
    """A sweep stopped by its bound holds the queue: the messages it took are not taken
    again until they have been consumed; then the sweep goes on past them."""
    queue = f"cq-{unique}"
    ids = [f"{queue}-{i}" for i in range(10)]
    holds: dict[str, Hold] = {}
    with kombu.Connection(AMQP_URL, transport_options={"confirm_publish": True}) as conn:
        kombu.Queue(queue, routing_key=queue).bind(conn.default_channel).declare()
        producer = conn.Producer()
        for task_id in ids:
            producer.publish({"i": task_id}, routing_key=queue, headers={"id": task_id})
        try:
            scanned = []
            for _ in range(5):
                result = sweep_queues(
                    conn, [queue], {ids[7]}.__contains__, max_messages=3, holds=holds
                )
                assert result.partial and not result.removed
                scanned.append(result.scanned)
            assert scanned == [3, 0, 0, 0, 0]
            channel: Any = conn.channel()
            first = [channel.basic_get(queue=queue, no_ack=True) for _ in range(3)]
            assert [raw.properties["application_headers"]["id"] for raw in first] == ids[:3]
            assert all(raw.delivery_info["redelivered"] for raw in first)
            result = sweep_queues(conn, [queue], {ids[7]}.__contains__, max_messages=5, holds=holds)
            assert [task_id for task_id, _ in result.removed] == [ids[7]]
            rest = []
            while (raw := channel.basic_get(queue=queue, no_ack=True)) is not None:
                rest.append(
                    (raw.properties["application_headers"]["id"], raw.delivery_info["redelivered"])
                )
            assert rest == [(i, True) for i in ids[3:7]] + [(i, False) for i in ids[8:]]
        finally:
            conn.default_channel.queue_delete(queue)


@pytest.mark.parametrize("max_deliveries", [None, 3])
def test_sweeps_stay_below_the_queues_own_delivery_limit(
    pg_url: str, unique: str, max_deliveries: int | None
) -> None:
    """The queue's own ``x-delivery-limit`` (3) is read from its declaration: with the
    default ``jobreaper_amqp_max_deliveries`` (10), or one equal to the limit, eight sweeps
    dead-letter nothing and leave every message with fewer deliveries than the limit."""
    queue, dead = f"hbrk-qq-{unique}", f"hbrk-dlq-{unique}"
    conf = {} if max_deliveries is None else {"amqp_max_deliveries": max_deliveries}
    app = _app(pg_url, queue, dead, **conf)
    try:
        ids = _fill(app, dead, 4)
        for _ in range(8):
            celery_jobreaper.revoke(app, [str(uuid.uuid4())])  # a target: the queue is read
            report = celery_jobreaper.reap(app)
            assert not report.broker.get("errors"), report.broker

        assert _drain(dead) == []
        with kombu.Connection(AMQP_URL) as conn:
            channel = conn.channel()
            wait_until(
                lambda: channel.queue_declare(queue=queue, passive=True).message_count == 4,
                30,
                "the messages to be back",
            )
            channel.close()
        left = _drain(queue)
        assert sorted(task_id for task_id, _ in left) == sorted(ids)
        assert max(count for _, count in left) <= 2  # strictly below the limit
    finally:
        app.close()
        with kombu.Connection(AMQP_URL) as conn:
            channel: Any = conn.channel()
            for name in (queue, dead):
                channel.queue_delete(name)
            channel.exchange_delete(queue)
            channel.close()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_full_sweep_keeps_the_order_of_the_rest(unique: str, queue_type: str) -> None:
    """No other consumer: a sweep that reaches the end of the queue removes the target and
    leaves the others in their order, a message published during the sweep behind them."""
    queue = f"hbrk-ord-{queue_type}-{unique}"
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else {}
    ids = [f"{queue}-{i}" for i in range(6)]
    late = f"{queue}-late"
    options = {"confirm_publish": True}
    with (
        kombu.Connection(AMQP_URL, transport_options=options) as conn,
        kombu.Connection(AMQP_URL, transport_options=options) as other,
    ):
        kombu.Queue(queue, routing_key=queue, queue_arguments=arguments).bind(
            conn.default_channel
        ).declare()
        try:
            producer = conn.Producer()
            for task_id in ids:
                producer.publish({"i": task_id}, routing_key=queue, headers={"id": task_id})
            seen: list[str] = []

            def remove(task_id: str) -> bool:
                seen.append(task_id)
                if len(seen) == 3:  # published while the sweep holds the first three
                    other.Producer().publish({"i": late}, routing_key=queue, headers={"id": late})
                return task_id == ids[4]

            result = sweep_queues(conn, [queue], remove)
            assert [task_id for task_id, _ in result.removed] == [ids[4]]
            channel: Any = conn.channel()
            wait_until(
                lambda: channel.queue_declare(queue=queue, passive=True).message_count == 6,
                30,
                "the messages to be back",
            )
            left = []
            while (raw := channel.basic_get(queue=queue, no_ack=True)) is not None:
                left.append(raw.properties["application_headers"]["id"])
            assert left == [*ids[:4], ids[5], late]
        finally:
            conn.default_channel.queue_delete(queue)
