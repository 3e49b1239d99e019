"""Result rows with real workers: ``task_track_started``, the result backend on a fresh
PostgreSQL database (Celery's ``db+…``; django-celery-results in a real Django project, its
migrations run), one worker SIGKILLed mid-task and restarted, another still running a task of
its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from billiard.exceptions import WorkerLostError
from celery import Celery, states
from celery.result import AsyncResult
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, ROOT, TESTS, WorkerProcess, wait_until

from celery_jobreaper.schema import tables

pytestmark = pytest.mark.slow

SOURCE = "celery_taskmeta"


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def _periodic_after(engine: Engine, node: str, after: datetime) -> int:
    """How many periodic reaps of *node* started after *after* and finished."""
    runs = tables.runs
    with engine.connect() as conn:
        found = conn.execute(
            select(runs.c.id).where(
                runs.c.node == node,
                runs.c.trigger == "periodic",
                runs.c.started_at > after,
                runs.c.finished_at.is_not(None),
            )
        ).all()
    return len(found)


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
        # The cluster's leader (one of the two) reaps again on its timer: nothing more is
        # settled, B's row untouched.
        wait_until(
            lambda: max(_periodic_after(engine, n, event.at) for n in (name_a, name_b)) >= 2, 60
        )
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


def _django(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <args>`` in the Django project's environment; fail on an error."""
    full = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        "DJANGO_SETTINGS_MODULE": "djangoproj.settings",
        **env,
    }
    full.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, "-m", *args],
        check=False,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_django_celery_results_row_of_a_killed_worker_fails_the_live_workers_stays(
    tmp_path: Path,
    pg_url: str,
    unique: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    name_a, name_b = f"a-{unique}@h", f"b-{unique}@h"
    queue_a, queue_b = f"jrq-{unique}", f"jrq-{unique}-b"
    base = {"JR_BROKER_URL": REDIS_URL, "JR_DATABASE_URL": pg_url}
    _django(base, "django", "migrate", "--noinput")
    producer = Celery(f"jr-producer-{unique}", broker=REDIS_URL, set_as_current=False)

    def worker(name: str, queue: str) -> WorkerProcess:
        return start_worker(name, env={**base, "JR_QUEUE": queue}, app="djangoproj")

    def check(*task_ids: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(_django(base, "djangoproj.check", *task_ids).stdout)
        return found

    def settled_events() -> list[Any]:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    select(tables.events).where(
                        tables.events.c.source == "django_celery_results_taskresult"
                    )
                )
            )

    try:
        first_a, worker_b = worker(name_a, queue_a), worker(name_b, queue_b)
        first_a.wait_for(r"@h ready\.")
        worker_b.wait_for(r"@h ready\.")
        task_a, task_b = (
            producer.send_task("jr.sleep", args=(300,), kwargs={"tag": tag}, queue=queue).id
            for tag, queue in (("ta", queue_a), ("tb", queue_b))
        )
        for tag in ("ta", "tb"):
            wait_until(lambda t=tag: (tmp_path / f"started-{t}").exists(), 60, f"{tag} to run")
        seen = check(task_a, task_b)
        assert (seen[task_a]["state"], seen[task_a]["info"]["hostname"]) == ("STARTED", name_a)
        assert (seen[task_b]["state"], seen[task_b]["info"]["hostname"]) == ("STARTED", name_b)
        child_a = int((tmp_path / "started-ta").read_text())

        first_a.kill()
        wait_until(lambda: _gone(child_a), 30, "A's pool child to die")
        assert check(task_a)[task_a]["state"] == "STARTED"

        second_a = worker(name_a, queue_a)
        out = second_a.wait_for(r"@h ready\.")
        clearing = out.find(
            f"jobreaper: Clearing job: {task_a} (jr.sleep) from django_celery_results_taskresult"
        )
        assert -1 < clearing < out.find(f"{name_a} ready."), out

        seen = check(task_a, task_b)
        failed = seen[task_a]
        assert failed["state"] == "FAILURE", failed
        assert failed["type"] == "billiard.exceptions.WorkerLostError", failed
        assert failed["message"].startswith(f"Worker lost: {name_a} (found by jobreaper at ")
        # its age comes from the row's own date_started
        assert re.search(
            rf"was STARTED for \d+:\d\d:\d\d on {re.escape(name_a)} ", failed["message"]
        )
        assert "WorkerLostError" in (failed["traceback"] or "")
        assert failed["date_done"] is not None
        assert seen[task_b]["state"] == "STARTED" and seen[task_b]["info"]["hostname"] == name_b
        [event] = settled_events()
        assert (event.job_id, event.owner, event.previous_status, event.new_status) == (
            task_a,
            name_a,
            "STARTED",
            "FAILURE",
        )
        wait_until(
            lambda: max(_periodic_after(engine, n, event.at) for n in (name_a, name_b)) >= 2, 60
        )
        assert len(settled_events()) == 1
        assert check(task_b)[task_b]["state"] == "STARTED"
    finally:
        producer.close()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for name in (queue_a, queue_b):
                client.delete(name, f"_kombu.binding.{name}")
        finally:
            client.close()
