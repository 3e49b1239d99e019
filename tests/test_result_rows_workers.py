"""Celery's result rows with real workers: ``task_track_started``, the database result backend
on a fresh PostgreSQL database, one worker SIGKILLed mid-task and restarted, another still
running a task of its own."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from billiard.exceptions import WorkerLostError
from celery import Celery, states
from celery.result import AsyncResult
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, WorkerProcess, wait_until

from celery_jobreaper.schema import tables

pytestmark = pytest.mark.slow

SOURCE = "celery_taskmeta"


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def test_killed_workers_started_row_fails_and_the_live_workers_stays_started(
    tmp_path: Path,
    pg_url: str,
    unique: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    backend = f"db+{pg_url}"
    engine = engine_for(pg_url)
    producer = Celery(f"jr-producer-{unique}", broker=REDIS_URL, backend=backend)
    producer.conf.task_track_started = True
    name_a, name_b = f"a-{unique}@h", f"b-{unique}@h"
    queue_a, queue_b = f"jrq-{unique}", f"jrq-{unique}-b"

    def env(queue: str) -> dict[str, str]:
        return {
            "JR_BROKER_URL": REDIS_URL,
            "JR_DATABASE_URL": pg_url,
            "JR_QUEUE": queue,
            # only "an earlier start of this worker is dead" can settle A's row at its restart
            "JR_SETTINGS": json.dumps({"heartbeat_timeout": 60}),
            "JR_RESULT_BACKEND": backend,
        }

    def send(queue: str, tag: str) -> AsyncResult[Any]:
        return producer.send_task("jr.sleep", args=(300,), kwargs={"tag": tag}, queue=queue)

    def settled_events() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(select(tables.events).where(tables.events.c.source == SOURCE)))

    try:
        first_a = start_worker(name_a, env=env(queue_a))
        worker_b = start_worker(name_b, env=env(queue_b))
        first_a.wait_for(r"@h ready\.")
        worker_b.wait_for(r"@h ready\.")
        task_a, task_b = send(queue_a, "ta"), send(queue_b, "tb")
        for tag in ("ta", "tb"):
            wait_until(lambda t=tag: (tmp_path / f"started-{t}").exists(), 60, f"{tag} to run")
        for result, node in ((task_a, name_a), (task_b, name_b)):
            assert result.state == states.STARTED
            assert result.info["hostname"] == node
        child_a = int((tmp_path / "started-ta").read_text())

        first_a.kill()  # SIGKILL to main process and pool child
        wait_until(lambda: _gone(child_a), 30, "A's pool child to die")
        assert AsyncResult(task_a.id, app=producer).state == states.STARTED
        assert settled_events() == []

        second_a = start_worker(name_a, env=env(queue_a))
        out = second_a.wait_for(r"@h ready\.")
        clearing = out.find(f"jobreaper: Clearing job: {task_a.id} (jr.sleep) from {SOURCE}")
        assert -1 < clearing < out.find(f"{name_a} ready."), out

        failed = AsyncResult(task_a.id, app=producer)
        assert failed.state == states.FAILURE
        assert isinstance(failed.result, WorkerLostError)
        message = str(failed.result)
        assert message.startswith(f"Worker lost: {name_a} (found by jobreaper at "), message
        assert f"on {name_a} (an earlier start of this worker)" in message, message
        assert "WorkerLostError" in (failed.traceback or "")
        assert failed.date_done is not None
        live = AsyncResult(task_b.id, app=producer)
        assert live.state == states.STARTED and live.info["hostname"] == name_b

        [event] = settled_events()
        assert (event.job_id, event.owner, event.previous_status, event.new_status) == (
            task_a.id,
            name_a,
            states.STARTED,
            states.FAILURE,
        )
        # Both workers reap again on their timers: nothing more is settled, B's row untouched.
        runs = tables.runs

        def periodic_after(node: str) -> int:
            with engine.connect() as conn:
                return len(
                    conn.execute(
                        select(runs.c.id).where(
                            runs.c.node == node,
                            runs.c.trigger == "periodic",
                            runs.c.started_at > event.at,
                            runs.c.finished_at.is_not(None),
                        )
                    ).all()
                )

        wait_until(lambda: min(periodic_after(name_a), periodic_after(name_b)) >= 2, 60)
        assert len(settled_events()) == 1
        assert AsyncResult(task_b.id, app=producer).state == states.STARTED
        assert (tmp_path / "started-tb").exists() and not (tmp_path / "finished-tb").exists()
    finally:
        if producer._backend is not None:
            producer._backend.session_manager.invalidate(producer._backend.url)
        producer.close()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for name in (queue_a, queue_b):
                client.delete(name, f"_kombu.binding.{name}")
        finally:
            client.close()
