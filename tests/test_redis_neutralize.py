"""A target too deep in a long Redis list is neutralized in place and never runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery
from support import REDIS_URL, WorkerProcess, wait_until, worker_env

from celery_jobreaper.broker.redis import budget, sweep_queues


def test_deep_target_is_neutralized_then_discarded_by_a_worker(
    pg_url: str,
    prefix: str,
    unique: str,
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With the reach forced to 1,000 entries, 5 targets in the middle of 5,000 messages are
    rewritten in place (the list keeps its length and order); a real worker then runs every
    other message in order and none of the 5; targets near the ends are taken out."""
    for name in ("MIN_REACH", "FIRST_REACH", "MAX_REACH"):
        monkeypatch.setattr(budget, name, 1_000)
    queue, record_key = f"q-{unique}", f"{prefix}record"
    app = Celery("sender", broker=REDIS_URL, set_as_current=False)
    app.conf.update(task_default_queue=queue, broker_transport_options={"global_keyprefix": prefix})
    sent = []
    with app.producer_or_acquire() as producer:
        for i in range(5_000):
            result = app.send_task("jr.record", args=(f"v{i}",), queue=queue, producer=producer)
            sent.append((result.id, f"v{i}"))
    deep = {sent[i][0] for i in (2_000, 2_001, 2_500, 3_000, 3_900)}
    shallow = {sent[i][0] for i in (3, 4_990)}
    client = redis.Redis.from_url(REDIS_URL)
    before = client.llen(prefix + queue)

    result = sweep_queues(client, [queue], (deep | shallow).__contains__, global_keyprefix=prefix)

    assert result.neutralized == len(deep)
    assert sorted(t for t, _ in result.removed) == sorted(deep | shallow)
    assert client.llen(prefix + queue) == before - len(shallow)
    again = sweep_queues(client, [queue], deep.__contains__, global_keyprefix=prefix)
    assert (again.neutralized, again.removed, again.partial) == (0, [], False)

    worker = start_worker(
        f"n-{unique}@h",
        env={
            **worker_env(pg_url, queue, queue_cleanup="off"),
            "JR_KEYPREFIX": prefix,
            "JR_RECORD_URL": REDIS_URL,
            "JR_RECORD_KEY": record_key,
        },
        pool="solo",  # one at a time in queue order, without a pool process's round trip
    )
    worker.wait_for(r" ready\.")
    expected = [v for task_id, v in sent if task_id not in deep | shallow]
    wait_until(lambda: client.llen(record_key) >= len(expected), 180, "the others to run")
    log = worker.wait_for("Discarding revoked task", timeout=60, count=len(deep))
    assert all(f"Discarding revoked task: jr.record[{i}]" in log for i in deep)
    assert [v.decode() for v in client.lrange(record_key, 0, -1)] == expected
    assert client.llen(prefix + queue) == 0
    client.close()
    app.close()
