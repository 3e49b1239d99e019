"""Redis ``unacked`` restore never runs a task twice (issue 6, item 8), with real workers.

kombu's ``unacked`` hash does not say which worker holds an entry: the sweep reads one
snapshot, asks every worker on the broker about exactly those entries, and restores only
what nobody holds, and nothing while any worker on the broker cannot answer.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu
import redis
from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, WorkerProcess, wait_until, worker_env

import celery_jobreaper
from celery_jobreaper.report import Report
from celery_jobreaper.schema import tables


def _app(db_url: str, queue: str, prefix: str, **jobreaper: Any) -> Celery:
    app = Celery("reaper", broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options={"global_keyprefix": prefix},
        jobreaper_database_url=db_url,
        jobreaper_track_tasks=False,
    )
    for key, value in jobreaper.items():
        app.conf[f"jobreaper_{key}"] = value
    return app


def _env(db_url: str, queue: str, prefix: str, **settings: Any) -> dict[str, str]:
    return {**worker_env(db_url, queue, **settings), "JR_KEYPREFIX": prefix}


def _orphan(app: Celery, prefix: str, queue: str, tag: str) -> str:
    """An ``unacked`` entry of a consumer that took a message and vanished; its task id."""
    result = app.send_task("jr.sleep", args=(0,), kwargs={"tag": tag}, queue=queue)
    options = {"global_keyprefix": prefix}
    with kombu.Connection(REDIS_URL, transport_options=options) as conn:
        channel: Any = conn.channel()
        channel.qos.restore_at_shutdown = False  # a killed worker restores nothing
        message = kombu.Queue(queue).bind(channel).get(no_ack=False)
        assert message is not None and message.headers["id"] == result.id
        channel.close()
    client = redis.Redis.from_url(REDIS_URL)
    client.zadd(f"{prefix}unacked_index", {str(message.delivery_tag): time.time() - 1000}, xx=True)
    client.close()
    return str(result.id)


def _restored(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(tables.events.c.task_id).where(tables.events.c.action == "restored")
            ).scalars()
        )


def _starts(tmp_path: Path, tag: str) -> int:
    marks = tmp_path / "marks.log"
    lines = marks.read_text().splitlines() if marks.exists() else []
    return sum(1 for line in lines if line.split()[0] == f"started-{tag}")


def test_entry_delivered_during_the_ask_window_is_not_restored(
    pg_url: str,
    prefix: str,
    unique: str,
    tmp_path: Path,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """An old orphan entry makes the reaper ask; a task delivered to a live acks_late worker
    while it asks is not restored (it was not in the snapshot that was asked about)."""
    queue = f"q-{unique}"
    env = {
        **_env(pg_url, queue, prefix, unacked_grace=0, queue_cleanup="off"),
        "JR_ACKS_LATE": "1",
    }
    worker = start_worker(f"w-{unique}@h", env=env)
    worker.wait_for(r" ready\.")
    app = _app(pg_url, queue, prefix, unacked_grace=0, ping_timeout=3)
    orphan = _orphan(app, prefix, f"dead-{unique}", "orphan")
    reports: list[Report] = []
    reaper = threading.Thread(target=lambda: reports.append(celery_jobreaper.reap(app)))
    reaper.start()
    time.sleep(0.5)
    late = app.send_task("jr.sleep", args=(4,), kwargs={"tag": "late"}, queue=queue)
    reaper.join(120)
    wait_until((tmp_path / "finished-late").exists, 60, "the late task to finish")
    time.sleep(3)  # a restored copy would be taken and started by now
    assert _starts(tmp_path, "late") == 1
    assert late.id not in _restored(engine_for(pg_url))
    assert reports and reports[0].broker["restored"] == 1  # the orphan nobody holds
    assert _restored(engine_for(pg_url)) == [orphan]
    app.close()


def test_rate_limited_tasks_held_by_a_live_worker_are_not_restored(
    pg_url: str,
    prefix: str,
    unique: str,
    tmp_path: Path,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Rate-limited requests wait in the consumer's token bucket (not in Celery's
    ``requests``, so ``query_task`` does not see them); two reapers every second leave
    their unacked entries alone, and each task runs exactly once."""
    queue = f"q-{unique}"
    holder = start_worker(
        f"rl-{unique}@h", env={**_env(pg_url, queue, prefix, unacked_grace=0), "JR_PREFETCH": "4"}
    )
    reaper = start_worker(f"r-{unique}@h", env=_env(pg_url, f"o-{unique}", prefix, unacked_grace=0))
    holder.wait_for(r" ready\.")
    reaper.wait_for(r" ready\.")
    app = _app(pg_url, queue, prefix)
    replies = app.control.rate_limit(
        "jr.sleep", "12/m", destination=[f"rl-{unique}@h"], reply=True, timeout=5
    )
    assert replies, "the worker did not take the rate limit"
    sent = [
        app.send_task("jr.sleep", args=(0,), kwargs={"tag": f"rl{i}"}, queue=queue)
        for i in range(3)
    ]
    wait_until((tmp_path / "finished-rl2").exists, 120, "the rate-limited tasks to run")
    time.sleep(6)  # one more rate-limit period: a restored copy would run by now
    assert [_starts(tmp_path, f"rl{i}") for i in range(3)] == [1, 1, 1]
    assert not {s.id for s in sent} & set(_restored(engine_for(pg_url)))
    app.close()


def test_eta_task_held_by_a_live_worker_is_not_restored(
    pg_url: str,
    prefix: str,
    unique: str,
    tmp_path: Path,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """A countdown task waits unacknowledged in its worker's timer; reapers every second
    leave it alone and it runs once."""
    queue = f"q-{unique}"
    holder = start_worker(f"eta-{unique}@h", env=_env(pg_url, queue, prefix, unacked_grace=0))
    reaper = start_worker(f"r-{unique}@h", env=_env(pg_url, f"o-{unique}", prefix, unacked_grace=0))
    holder.wait_for(r" ready\.")
    reaper.wait_for(r" ready\.")
    app = _app(pg_url, queue, prefix)
    eta = app.send_task("jr.sleep", args=(0,), kwargs={"tag": "eta"}, queue=queue, countdown=8)
    wait_until((tmp_path / "finished-eta").exists, 120, "the countdown task to run")
    time.sleep(3)
    assert _starts(tmp_path, "eta") == 1
    assert eta.id not in _restored(engine_for(pg_url))
    app.close()


def test_a_silent_worker_unknown_to_jobreaper_means_nothing_is_restored(
    pg_url: str,
    prefix: str,
    unique: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """A paused worker without jobreaper is on the broker and may hold any entry: nothing
    is restored while it cannot answer; once it answers (and holds nothing) the orphan is."""
    queue = f"q-{unique}"
    plain = start_worker(
        f"plain-{unique}@h", env={**_env(pg_url, f"p-{unique}", prefix), "JR_NO_INSTALL": "1"}
    )
    plain.wait_for(r" ready\.")
    app = _app(pg_url, queue, prefix, unacked_grace=0, ping_timeout=1)
    orphan = _orphan(app, prefix, f"dead-{unique}", "orphan")
    plain.signal(signal.SIGSTOP)
    try:
        report = celery_jobreaper.reap(app)
    finally:
        plain.signal(signal.SIGCONT)
    assert report.broker["restored"] == 0
    assert _restored(engine_for(pg_url)) == []
    # Awake, it answers, but it has no jobreaper command: still "don't know".
    assert celery_jobreaper.reap(app).broker["restored"] == 0
    plain.kill()
    wait_until(lambda: celery_jobreaper.reap(app).broker["restored"] == 1, 30, "the restore")
    assert _restored(engine_for(pg_url)) == [orphan]
    app.close()
