"""The broker sweep with real workers on real Redis and RabbitMQ (issue: exact removal)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import AMQP_URL, REDIS_URL, TESTS, WorkerProcess, wait_until, worker_env

import celery_jobreaper
from celery_jobreaper import Settings
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import tables
from celery_jobreaper.service import ReaperService
from celery_jobreaper.sweep import BrokerSweep


@pytest.fixture
def rclient(prefix: str) -> Iterator[redis.Redis[bytes]]:
    client: redis.Redis[bytes] = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def _sender(broker: str, db_url: str, queue: str, prefix: str) -> Celery:
    app = Celery("sender", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue, jobreaper_database_url=db_url, jobreaper_ping_timeout=0.3
    )
    if broker.startswith("redis"):
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
    return app


def _env(broker: str, db_url: str, queue: str, prefix: str, **settings: Any) -> dict[str, str]:
    return {
        **worker_env(db_url, queue, broker=broker, **settings),
        "JR_RECORD_URL": REDIS_URL,
        "JR_RECORD_KEY": f"{prefix}record",
        "JR_KEYPREFIX": prefix,
    }


def _publish(app: Celery, queue: str, n: int, priorities: bool) -> list[tuple[str, int, str]]:
    """Publish *n* jr.record tasks; return (task id, priority, value) in publish order."""
    sent = []
    with app.producer_or_acquire() as producer:
        for i in range(n):
            priority = (i * 7) % 10 if priorities else 0
            result = app.send_task(
                "jr.record", args=(f"v{i}",), queue=queue, priority=priority, producer=producer
            )
            sent.append((result.id, priority, f"v{i}"))
    return sent


def _expected_order(sent: list[tuple[str, int, str]], steps: tuple[int, ...]) -> list[str]:
    """Consumption order on kombu's Redis transport: by priority step, then FIFO."""

    def step(p: int) -> int:
        return max(s for s in steps if s <= p)

    return [v for _tid, _p, v in sorted(sent, key=lambda s: step(s[1]))]


def test_redis_revoked_messages_removed_exactly_before_consuming(
    pg_url: str,
    prefix: str,
    unique: str,
    rclient: redis.Redis[bytes],
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """10k queued across priorities, 100 revoked (50 while no worker ran): the 100 never run,
    the other 9,900 run, in the order they were queued."""
    queue, record_key = f"q-{unique}", f"{prefix}record"
    app = _sender(REDIS_URL, pg_url, queue, prefix)
    sent = _publish(app, queue, 10_000, priorities=True)
    revoked = [sent[i][0] for i in range(0, 10_000, 100)]
    # 50 revoked durably while no worker is online (Celery alone would lose these)...
    celery_jobreaper.revoke(app, revoked[:50])
    # ...and 50 revoked while only an unrelated worker (another queue) is online.
    other = start_worker(
        f"other-{unique}@h", env=_env(REDIS_URL, pg_url, f"other-{unique}", prefix)
    )
    other.wait_for(r" ready\.")
    app.control.revoke(revoked[50:], destination=[f"other-{unique}@h"])
    wait_until(lambda: _revoked_rows(engine_for(pg_url)) >= 100, 30, "revoked ids to be stored")

    worker = start_worker(f"w-{unique}@h", env=_env(REDIS_URL, pg_url, queue, prefix), pool="solo")
    log = worker.wait_for(r" ready\.")
    assert "jobreaper: removed 100 message(s) from" in log, log
    wait_until(lambda: rclient.llen(record_key) >= 9_900, 240, "the 9,900 tasks to run")
    done = [v.decode() for v in rclient.lrange(record_key, 0, -1)]
    revoked_values = {sent[i][2] for i in range(0, 10_000, 100)}
    kept = [s for s in sent if s[2] not in revoked_values]
    assert not revoked_values & set(done)
    assert done == _expected_order(kept, (0, 3, 6, 9))
    with engine_for(pg_url).connect() as conn:
        removed = (
            conn.execute(select(tables.events.c.task_id).where(tables.events.c.action == "removed"))
            .scalars()
            .all()
        )
    assert sorted(removed) == sorted(revoked)


def _revoked_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(tables.revoked.c.task_id)).all())


def test_acks_late_dead_worker_unacked_dropped_or_restored_now(
    pg_url: str,
    prefix: str,
    unique: str,
    tmp_path: Path,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """A SIGKILLed acks_late worker: its running job is failed and its message dropped; the
    message it had prefetched is restored at once (not after visibility_timeout) and runs."""
    queue = f"q-{unique}"
    env = {
        **_env(REDIS_URL, pg_url, queue, prefix, unacked_grace=0),
        "JR_ACKS_LATE": "1",
        "JR_PREFETCH": "2",  # each worker holds the next message too, unacked
    }
    node = f"late-{unique}@h"
    first = start_worker(node, env=env)
    first.wait_for(r" ready\.")
    app = _sender(REDIS_URL, pg_url, queue, prefix)
    running = app.send_task("jr.sleep", args=(120,), kwargs={"tag": "running"}, queue=queue)
    waiting = app.send_task("jr.sleep", args=(0,), kwargs={"tag": "waiting"}, queue=queue)
    wait_until((tmp_path / "started-running").exists, 60, "the first task to start")
    r = redis.Redis.from_url(REDIS_URL)
    wait_until(
        lambda: r.hlen(f"{prefix}unacked") and _unacked_ids(r, prefix) >= {running.id, waiting.id},
        30,
        "both messages to be held unacked",
    )
    jobs = engine_for(pg_url)
    row = select(tables.jobs.c.task_id).where(tables.jobs.c.task_id == running.id)
    with jobs.connect() as conn:  # its start is written by the pool process's tracking writer
        wait_until(lambda: conn.execute(row).first(), 10, "the running task's tracked row")
    first.kill()

    second = start_worker(node, env=env)  # same node name: its old self is dead at once
    second.wait_for(r" ready\.")
    log = second.wait_for(r"dropped unacked message of task")
    assert f"dropped unacked message of task {running.id}: its job was settled as failed" in log
    assert f"restored unacked message of task {waiting.id}" in log
    wait_until((tmp_path / "finished-waiting").exists, 60, "the restored task to run")
    assert not (r.hexists(f"{prefix}unacked", running.id) or running.id in _unacked_ids(r, prefix))
    marks = (tmp_path / "marks.log").read_text().split()
    assert marks.count("started-running") == 1  # the failed job never ran again
    with engine_for(pg_url).connect() as conn:
        job = conn.execute(select(tables.jobs).where(tables.jobs.c.task_id == running.id)).one()
        actions = dict(
            conn.execute(
                select(tables.events.c.task_id, tables.events.c.action).where(
                    tables.events.c.source == "broker"
                )
            ).all()
        )
    assert job.status == "failed"
    assert actions == {running.id: "dropped", waiting.id: "restored"}
    r.close()


def _unacked_ids(client: redis.Redis[bytes], prefix: str) -> set[str]:
    ids = set()
    for raw in client.hvals(f"{prefix}unacked"):
        ids.add(json.loads(raw)[0]["headers"]["id"])
    return ids


def test_live_peer_unacked_and_reserved_messages_untouched(
    pg_url: str,
    prefix: str,
    unique: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
    rclient: redis.Redis[bytes],
) -> None:
    queue = f"q-{unique}"
    env = {
        **_env(REDIS_URL, pg_url, queue, prefix, unacked_grace=0),
        "JR_ACKS_LATE": "1",
        "JR_PREFETCH": "2",  # each worker holds the next message too, unacked
    }
    peer = start_worker(f"peer-{unique}@h", env=env)
    peer.wait_for(r" ready\.")
    app = _sender(REDIS_URL, pg_url, queue, prefix)
    held = [
        app.send_task("jr.sleep", args=(6,), kwargs={"tag": f"h{i}"}, queue=queue) for i in range(2)
    ]
    wait_until((tmp_path / "started-h0").exists, 60, "the peer to start a task")
    wait_until(lambda: _unacked_ids(rclient, prefix) >= {h.id for h in held}, 30, "both held")

    newcomer = start_worker(f"new-{unique}@h", env={**env, "JR_QUEUE": f"other-{unique}"})
    log = newcomer.wait_for(r" ready\.")
    assert "unacked message" not in log
    assert _unacked_ids(rclient, prefix) >= {h.id for h in held}
    wait_until((tmp_path / "finished-h1").exists, 90, "the peer to finish both")
    marks = (tmp_path / "marks.log").read_text().split()
    assert marks.count("started-h0") == 1 and marks.count("started-h1") == 1


def test_malformed_entries_survive_and_dry_run_lists_only(
    pg_url: str,
    prefix: str,
    unique: str,
    rclient: redis.Redis[bytes],
) -> None:
    queue = f"q-{unique}"
    app = _sender(REDIS_URL, pg_url, queue, prefix)
    sent = _publish(app, queue, 20, priorities=False)
    garbage = [b"not json", b'{"no": "headers"}', b'{"headers": {}, "body": "x"}']
    for g in garbage:
        rclient.lpush(prefix + queue, g)
    celery_jobreaper.revoke(app, [sent[3][0], sent[7][0]])
    before = rclient.lrange(prefix + queue, 0, -1)

    dry = celery_jobreaper.reap(app, dry_run=True)
    assert dry.broker["removed"] == 2 and rclient.lrange(prefix + queue, 0, -1) == before

    report = celery_jobreaper.reap(app)
    after = rclient.lrange(prefix + queue, 0, -1)
    assert report.broker["removed"] == 2 and report.broker["unparsable"] == 3
    assert after == [m for m in before if m not in {before[-1 - 3], before[-1 - 7]}]
    assert all(g in after for g in garbage)


@pytest.mark.xdist_group("rabbitmq")  # one vhost: its broadcasts reach every worker on it
def test_rabbitmq_revoked_messages_removed_and_others_run_in_order(
    pg_url: str,
    prefix: str,
    unique: str,
    rclient: redis.Redis[bytes],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    queue, record_key = f"q-{unique}", f"{prefix}record"
    app = _sender(AMQP_URL, pg_url, queue, prefix)
    sent = _publish(app, queue, 1_000, priorities=False)
    revoked = [sent[i][0] for i in range(5, 1_000, 20)]
    celery_jobreaper.revoke(app, revoked)  # no worker online
    try:
        worker = start_worker(f"amqp-{unique}@h", env=_env(AMQP_URL, pg_url, queue, prefix))
        log = worker.wait_for(r" ready\.")
        assert f"jobreaper: removed {len(revoked)} message(s) from {queue}" in log
        wait_until(lambda: rclient.llen(record_key) >= 1_000 - len(revoked), 120, "tasks run")
        done = [v.decode() for v in rclient.lrange(record_key, 0, -1)]
        revoked_values = {sent[i][2] for i in range(5, 1_000, 20)}
        exp = [v for _t, _p, v in sent if v not in revoked_values]
        assert done == exp
    finally:
        with Connection(AMQP_URL) as conn:
            conn.default_channel.queue_delete(queue)


def test_purge_mode_empties_this_workers_queue_at_start(
    pg_url: str,
    prefix: str,
    unique: str,
    rclient: redis.Redis[bytes],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    queue = f"q-{unique}"
    app = _sender(REDIS_URL, pg_url, queue, prefix)
    _publish(app, queue, 30, priorities=True)
    _publish(app, f"keep-{unique}", 5, priorities=False)
    worker = start_worker(
        f"purge-{unique}@h",
        pool="solo",
        env=_env(REDIS_URL, pg_url, queue, prefix, queue_cleanup="purge"),
    )
    log = worker.wait_for(r" ready\.")
    assert f"jobreaper: Purged 30 message(s) from {queue}" in log
    assert rclient.llen(f"{prefix}keep-{unique}") == 5  # other queues are not this worker's
    app.send_task("jr.record", args=("sentinel",), queue=queue)
    wait_until(lambda: rclient.llen(f"{prefix}record") >= 1, 60, "the sentinel task to run")
    assert rclient.lrange(f"{prefix}record", 0, -1) == [b"sentinel"]  # none of the 30 ran


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_broker_unreachable_at_start_worker_starts_and_sweep_retries(
    pg_url: str,
    prefix: str,
    unique: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """A broker of our own, down when the worker starts and started afterwards."""
    port = _free_port()
    broker, queue, node = f"redis://127.0.0.1:{port}/0", f"q-{unique}", f"nb-{unique}@h"
    env = _env(broker, pg_url, queue, prefix)
    worker = start_worker(node, env=env, pool="solo")
    log = worker.wait_for(r"jobreaper: broker sweep failed")
    assert "Traceback" in log and worker.proc.poll() is None
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        worker.wait_for(r" ready\.", timeout=120)
        app = _sender(broker, pg_url, queue, prefix)
        app.send_task("jr.sleep", args=(0,), kwargs={"tag": "after"}, queue=queue)
        wait_until((tmp_path / "finished-after").exists, 60, "a task to run once the broker is up")

        def clean_periodic_sweep() -> bool:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workerapp",
                    "inspect",
                    "jobreaper",
                    "-d",
                    node,
                    "-j",
                ],
                env={**os.environ, **env, "PYTHONPATH": str(TESTS)},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if out.returncode:
                return False
            last = json.loads(out.stdout)[node]["last_run"]
            return last["trigger"] == "periodic" and "errors" not in last["broker"]

        wait_until(clean_periodic_sweep, 60, "a periodic run whose sweep succeeds")
        app.close()
    finally:
        worker.kill()
        server.terminate()
        server.wait(timeout=30)


def test_purge_happens_only_before_consuming_not_when_a_failed_startup_reap_is_retried(
    pg_url: str, prefix: str, unique: str, rclient: redis.Redis[bytes]
) -> None:
    """The startup reap failed (database down at start), so the worker consumed without it:
    the reap its timer runs later must not purge queues that now hold live jobs (§2.6)."""
    queue = f"q-{unique}"
    app = _sender(REDIS_URL, pg_url, queue, prefix)
    app.conf.task_default_queue = queue
    app.conf.jobreaper_queue_cleanup = "purge"
    _publish(app, queue, 7, priorities=False)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    me = Incarnation.new(f"purge-{unique}@h")
    reaper = Reaper(
        app, settings, db, me=me, sweep=BrokerSweep(app, settings, db, tables, lambda: [queue])
    )
    service = ReaperService(reaper, me)
    try:
        service.periodic()  # the timer's first reap, the startup reap never having run
        assert rclient.llen(f"{prefix}{queue}") == 7
        service.startup()  # the step's start, before the consumer: the purge happens here
        assert rclient.llen(f"{prefix}{queue}") == 0
    finally:
        db.dispose()
