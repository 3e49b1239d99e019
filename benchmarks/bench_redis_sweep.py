"""Time ``broker.redis.sweep_queues`` against one plain chunked read of the same Redis list.

Usage: python benchmarks/bench_redis_sweep.py [N] [TARGETS]   (default 1,000,000 and N/1000)

Fills one queue list (own Redis db, default 15; keys deleted before and after) with N
realistic Celery protocol 2 messages, targets TARGETS of them spread at random, and reports,
side by side, the time to read the whole list in chunks the way the sweep reads it (LRANGE
from the tail, ``chunk`` entries at a time) and the time the sweep takes to remove the
targets; the goal is a ratio of at most 3. Then the same for 10,000 queued / 100 targeted.
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from typing import Any

import redis
from celery import Celery

from celery_jobreaper.broker import task_id_of
from celery_jobreaper.broker.redis import sweep_queues

REDIS_URL = os.environ.get("JR_BENCH_REDIS_SWEEP", "redis://127.0.0.1:6379/15")
CHUNK = 10_000
PREFIX = "jrbench-sweep-"


def template(client: redis.Redis[Any]) -> bytes:
    """One real message as Celery 5 + kombu store it, to copy with fresh ids."""
    queue = f"{PREFIX}template-{uuid.uuid4().hex[:8]}"
    app = Celery("bench", broker=REDIS_URL, set_as_current=False)
    try:
        app.send_task(
            "proj.tasks.process_order",
            args=(12345, "EUR"),
            kwargs={"customer": 42, "notify": True},
            queue=queue,
            task_id=str(uuid.UUID(int=1)),
        )
    finally:
        app.close()
    message: bytes | None = client.rpop(queue)
    assert message is not None
    return message


def fill(client: redis.Redis[Any], key: str, count: int, sample: bytes) -> list[str]:
    """LPUSH *count* copies of *sample*, each with its own task id and delivery tag."""
    old_id = str(uuid.UUID(int=1)).encode()
    old_tag = task_delivery_tag(sample)
    ids: list[str] = []
    for start in range(0, count, CHUNK):
        batch = []
        for _ in range(min(CHUNK, count - start)):
            task_id = uuid.uuid4()
            ids.append(str(task_id))
            batch.append(
                sample.replace(old_id, str(task_id).encode()).replace(
                    old_tag, str(uuid.uuid4()).encode()
                )
            )
        client.lpush(key, *batch)
    return ids


def task_delivery_tag(message: bytes) -> bytes:
    marker = b'"delivery_tag": "'
    start = message.index(marker) + len(marker)
    return message[start : message.index(b'"', start)]


def read_all(client: redis.Redis[Any], key: str) -> int:
    """Read the whole list in chunks from the tail, as the sweep does; return the count."""
    seen = 0
    offset = 0
    while True:
        values = client.lrange(key, -(offset + CHUNK), -(offset + 1))
        seen += len(values)
        if len(values) < CHUNK:
            return seen
        offset += CHUNK


def script_stats(client: redis.Redis[Any]) -> tuple[int, float]:
    stats = client.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(entry["calls"]), float(entry["usec"])


def cleanup(client: redis.Redis[Any]) -> None:
    keys = list(client.scan_iter(match=f"*{PREFIX}*", count=10_000))
    for start in range(0, len(keys), 1_000):
        client.delete(*keys[start : start + 1_000])


def run_case(client: redis.Redis[Any], sample: bytes, count: int, targeted: int) -> None:
    key = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    began = time.perf_counter()
    ids = fill(client, key, count, sample)
    filled = time.perf_counter() - began
    targets = set(random.Random(1).sample(ids, targeted))
    assert task_id_of(client.lindex(key, 0) or b"") == ids[-1]

    began = time.perf_counter()
    read = read_all(client, key)
    read_time = time.perf_counter() - began
    assert read == count

    calls_before, usec_before = script_stats(client)
    slow_before = {entry["id"] for entry in client.slowlog_get(128)}
    began = time.perf_counter()
    result = sweep_queues(client, [key], targets.__contains__, chunk=CHUNK)
    sweep_time = time.perf_counter() - began
    calls_after, usec_after = script_stats(client)
    slow = [
        entry
        for entry in client.slowlog_get(128)
        if entry["id"] not in slow_before and b"EVALSHA" in bytes(entry["command"])[:16].upper()
    ]

    assert len(result.removed) == targeted, len(result.removed)
    assert client.llen(key) == count - targeted + result.neutralized
    calls = calls_after - calls_before
    script_ms = (usec_after - usec_before) / 1000
    threshold = client.config_get("slowlog-log-slower-than").get("slowlog-log-slower-than")
    print(f"\n== {count:,} queued, {targeted:,} targeted (one list, chunk {CHUNK:,})")
    print(f"  fill (pipelined LPUSH)           {filled:8.3f} s")
    print(f"  full chunked LRANGE read         {read_time:8.3f} s")
    print(f"  sweep_queues removing {targeted:<6,}     {sweep_time:8.3f} s")
    print(f"  ratio sweep / read               {sweep_time / read_time:8.2f} x   (target <= 3)")
    print(
        f"  taken out {targeted - result.neutralized:,}, neutralized in place (too deep to take "
        f"out within the time budget) {result.neutralized:,}"
    )
    print(
        f"  removal scripts: {calls} calls, {script_ms:.1f} ms inside Redis in all, "
        f"{script_ms / max(calls, 1):.2f} ms mean per call"
    )
    longest = max((entry["duration"] for entry in slow), default=0) / 1000
    print(
        f"  scripts over the slowlog threshold ({threshold} us): {len(slow)}"
        + (f", longest {longest:.1f} ms" if slow else "")
    )
    client.delete(key)


def main() -> None:
    count = int(sys.argv[1].replace("_", "")) if len(sys.argv) > 1 else 1_000_000
    targeted = int(sys.argv[2].replace("_", "")) if len(sys.argv) > 2 else max(1, count // 1000)
    client: redis.Redis[Any] = redis.Redis.from_url(REDIS_URL)
    cleanup(client)
    try:
        sample = template(client)
        print(f"Redis {client.info('server')['redis_version']} at {REDIS_URL}")
        print(f"message size {len(sample)} bytes")
        run_case(client, sample, count, targeted)
        run_case(client, sample, 10_000, 100)
    finally:
        cleanup(client)
        client.close()


if __name__ == "__main__":
    main()
