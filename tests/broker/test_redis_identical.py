"""Identical Redis bodies (two messages, same bytes) are each removed (issue 6, item 9a)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery

from celery_jobreaper.broker import task_id_of
from celery_jobreaper.broker.redis import sweep_queues


def _messages(app: Celery, client: redis.Redis[Any], queue: str, count: int) -> list[bytes]:
    """*count* real task messages (sent, then taken off the list)."""
    with app.producer_or_acquire() as producer:
        for i in range(count):
            app.send_task(
                "proj.tasks.work",
                args=(i,),
                queue=queue,
                task_id=str(uuid.uuid4()),
                producer=producer,
            )
    values = client.lrange(queue, 0, -1)
    client.delete(queue)
    return list(reversed(values))  # publish order


@pytest.mark.parametrize("chunk", [3, 7, 50, 10_000])
def test_every_copy_of_an_identical_body_is_removed(
    rclient: redis.Redis[Any],
    token: str,
    redis_url: str,
    make_app: Callable[..., Celery],
    chunk: int,
) -> None:
    """Copies next to each other, a few apart, in other chunks, and at both ends."""
    queue = f"q-{token}"
    plain = _messages(make_app(redis_url), rclient, queue, 200)
    target, other = _messages(make_app(redis_url), rclient, queue, 2)
    rng = random.Random(chunk)
    entries = list(plain)
    for at in sorted(
        {0, 1, 2, 5, 6, 7, 8, 40, 41, 99, 150, 199} | {rng.randrange(200) for _ in range(10)},
        reverse=True,
    ):
        entries.insert(at, target)
    entries.append(target)
    entries.insert(100, other)
    entries.insert(100, other)
    rclient.lpush(queue, *entries)  # entries[-1] is the head
    before = rclient.lrange(queue, 0, -1)
    copies = before.count(target)
    assert copies >= 13

    result = sweep_queues(rclient, [queue], {task_id_of(target)}.__contains__, chunk=chunk)

    after = rclient.lrange(queue, 0, -1)
    assert after == [entry for entry in before if entry != target]
    assert after.count(other) == 2
    assert len(result.removed) == copies
    assert result.scanned == len(before)
