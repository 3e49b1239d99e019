"""RabbitMQ: get-and-hold removal of exact messages, order kept, bounds honoured."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kombu
import pytest
from celery import Celery

from celery_jobreaper.broker import task_id_of
from celery_jobreaper.broker.amqp import sweep_queues

TASK = "proj.tasks.work"

# one RabbitMQ vhost for every test process: its broadcasts reach every worker on it
pytestmark = pytest.mark.xdist_group("rabbitmq")


#: Publisher confirms make every publish wait until the broker has queued the message, so a
#: sweep started after publishing sees all of them, in publish order.
CONFIRM = {"confirm_publish": True}


@pytest.fixture
def amqp_conn(amqp_url: str) -> Iterator[kombu.Connection]:
    with kombu.Connection(amqp_url, transport_options=CONFIRM) as conn:
        conn.ensure_connection(max_retries=1)
        yield conn


@pytest.fixture
def queue_name(amqp_conn: kombu.Connection, token: str) -> Iterator[str]:
    """A unique queue (and the exchange Celery makes for it), deleted afterwards."""
    name = f"jrb-{token}"
    yield name
    channel: Any = amqp_conn.channel()
    channel.queue_delete(name)
    channel.exchange_delete(name)
    channel.close()


GARBAGE_BODY = b"\x00\x01 opaque bytes from another producer"


def fill(app: Celery, queue: str, count: int) -> list[str | None]:
    """*count* task messages, with two foreign ones in the middle; ids in queue order."""
    order: list[str | None] = []
    with app.producer_or_acquire() as producer:
        for i in range(count):
            if i == count // 2:  # on the same channel, so they keep their place
                producer.publish(
                    GARBAGE_BODY,
                    routing_key=queue,
                    content_type="application/x-raw",
                    content_encoding="binary",
                )
                producer.publish({"no": "headers"}, routing_key=queue, serializer="json")
                order += [None, None]
            task_id = str(uuid.uuid4())
            app.send_task(TASK, args=(i,), queue=queue, task_id=task_id, producer=producer)
            order.append(task_id)
    return order


def drain(conn: kombu.Connection, queue: str) -> list[tuple[str | None, bytes]]:
    """Take every message off *queue* (auto-ack): (task id, body) in queue order."""
    channel: Any = conn.channel()
    out = []
    while (raw := channel.basic_get(queue=queue, no_ack=True)) is not None:
        message = channel.message_to_python(raw)
        task_id = task_id_of({"headers": message.headers, "properties": message.properties})
        out.append((task_id, message.body))
    channel.close()
    return out


def test_sweep_removes_exactly_the_targets_and_keeps_order(
    amqp_conn: kombu.Connection,
    queue_name: str,
    amqp_url: str,
    make_app: Callable[..., Celery],
) -> None:
    """1,000 messages, 50 targeted: targets gone, the rest (garbage too) in the same order."""
    order = fill(make_app(amqp_url, broker_transport_options=CONFIRM), queue_name, 1_000)
    targets = set(random.Random(5).sample([i for i in order if i], 50))

    result = sweep_queues(amqp_conn, [queue_name], targets.__contains__)

    assert sorted(task_id for task_id, _ in result.removed) == sorted(targets)
    assert {queue for _, queue in result.removed} == {queue_name}
    assert result.unparsable == 2
    assert result.scanned == 1_002
    assert not result.partial
    left = drain(amqp_conn, queue_name)
    assert [task_id for task_id, _ in left] == [i for i in order if i not in targets]
    assert GARBAGE_BODY in [body for _, body in left]


def test_dry_run_gives_everything_back(
    amqp_conn: kombu.Connection,
    queue_name: str,
    amqp_url: str,
    make_app: Callable[..., Celery],
) -> None:
    order = fill(make_app(amqp_url, broker_transport_options=CONFIRM), queue_name, 100)
    targets = {i for i in order[::10] if i}

    result = sweep_queues(amqp_conn, [queue_name], targets.__contains__, dry_run=True)

    assert {task_id for task_id, _ in result.removed} == targets
    assert [task_id for task_id, _ in drain(amqp_conn, queue_name)] == order


def test_bounds_stop_early_and_give_everything_back(
    amqp_conn: kombu.Connection,
    queue_name: str,
    amqp_url: str,
    make_app: Callable[..., Celery],
) -> None:
    """Hitting max_messages or max_seconds ends the sweep early; nothing else is lost."""
    order = fill(make_app(amqp_url, broker_transport_options=CONFIRM), queue_name, 300)
    ids = [i for i in order if i]
    targets = set(ids[::7])

    nothing = sweep_queues(amqp_conn, [queue_name], targets.__contains__, max_seconds=0)
    assert nothing.partial
    assert not nothing.removed
    assert nothing.scanned == 0

    result = sweep_queues(amqp_conn, [queue_name], targets.__contains__, max_messages=100)

    assert result.partial
    assert result.scanned == 100
    first_hundred = order[:100]
    assert sorted(t for t, _ in result.removed) == sorted(targets & set(first_hundred))
    removed = {task_id for task_id, _ in result.removed}
    assert [task_id for task_id, _ in drain(amqp_conn, queue_name)] == [
        i for i in order if i not in removed
    ]


def test_missing_queue_is_skipped(amqp_conn: kombu.Connection, token: str) -> None:
    result = sweep_queues(amqp_conn, [f"jrb-missing-{token}"], lambda _: True)
    assert result.scanned == 0
    assert not result.partial


def test_quorum_queue_keeps_order(amqp_conn: kombu.Connection, queue_name: str) -> None:
    """On a quorum queue too (closing the channel instead of basic.recover scrambles it)."""
    queue = kombu.Queue(
        queue_name, routing_key=queue_name, queue_arguments={"x-queue-type": "quorum"}
    )
    queue.bind(amqp_conn.default_channel).declare()
    producer = amqp_conn.Producer()
    ids = [f"{queue_name}-{i}" for i in range(30)]
    for task_id in ids:
        producer.publish({"i": task_id}, routing_key=queue_name, headers={"id": task_id})
    targets = set(ids[::4])

    result = sweep_queues(amqp_conn, [queue_name], targets.__contains__)

    assert {task_id for task_id, _ in result.removed} == targets
    channel: Any = amqp_conn.channel()
    left = []
    while (raw := channel.basic_get(queue=queue_name, no_ack=True)) is not None:
        left.append(raw.properties["application_headers"])
    channel.close()
    assert [headers["id"] for headers in left] == [i for i in ids if i not in targets]


def test_delivery_limits_read_from_declarations_and_the_server_version() -> None:
    """The declared ``x-delivery-limit`` wins; RabbitMQ 4 defaults to 20, 3.x to none; a
    negative limit (RabbitMQ 4: unlimited) is none."""
    from types import SimpleNamespace

    from celery_jobreaper.broker.amqp import delivery_limits

    declared = {
        "own": kombu.Queue("own", queue_arguments={"x-delivery-limit": 3}),
        "plain": kombu.Queue("plain"),
        "unlimited": kombu.Queue("unlimited", queue_arguments={"x-delivery-limit": -1}),
    }

    def server(version: bytes | str) -> Any:
        return SimpleNamespace(connection=SimpleNamespace(server_properties={"version": version}))

    assert delivery_limits(server("3.10.8"), declared) == {"own": 3}
    assert delivery_limits(server(b"4.1.0"), declared) == {"own": 3, "plain": 20}
