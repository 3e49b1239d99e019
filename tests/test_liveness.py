"""Liveness with real workers: duplicate node names are refused; warm shutdown drains then stops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, WorkerProcess, wait_until, worker_env

from celery_jobreaper.schema import tables


def _sender() -> Celery:
    return Celery("sender", broker=REDIS_URL, set_as_current=False)


def test_duplicate_live_node_name_is_refused(
    pg_url: str,
    engine_for: Callable[[str], Engine],
    unique: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    queue, node = f"q-{unique}", f"dup-{unique}@h"
    first = start_worker(node, env=worker_env(pg_url, queue))
    first.wait_for(r" ready\.")
    sender = _sender()
    result = sender.send_task("jr.sleep", args=(60,), kwargs={"tag": "long"}, queue=queue)
    wait_until((tmp_path / "started-long").exists, what="the long task to start")

    second = start_worker(node, env=worker_env(pg_url, f"other-{unique}"))
    log = second.wait_for(r" ready\.")
    assert f"jobreaper: refusing to settle jobs of {node}" in log
    assert "node names must be unique" in log
    second.wait_for(r"jobreaper: another live worker uses this node name")
    with engine.connect() as conn:
        job = conn.execute(select(tables.jobs).where(tables.jobs.c.task_id == result.id)).one()
        events = conn.execute(select(tables.events)).all()
    assert job.status == "running" and events == []
    sender.close()


def test_warm_shutdown_marks_draining_then_stopped_and_task_completes(
    pg_url: str,
    engine_for: Callable[[str], Engine],
    unique: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    queue = f"q-{unique}"
    worker = start_worker(f"warm-{unique}@h", env=worker_env(pg_url, queue))
    worker.wait_for(r" ready\.")
    sender = _sender()
    result = sender.send_task("jr.sleep", args=(4,), kwargs={"tag": "t"}, queue=queue)
    wait_until((tmp_path / "started-t").exists, what="the task to start")

    def state() -> str:
        with engine.connect() as conn:
            return str(conn.execute(select(tables.incarnations.c.state)).scalar())

    worker.proc.send_signal(15)
    wait_until(lambda: state() == "draining", timeout=10, what="draining")
    assert worker.proc.wait(timeout=60) == 0
    assert state() == "stopped"
    with engine.connect() as conn:
        job = conn.execute(select(tables.jobs).where(tables.jobs.c.task_id == result.id)).one()
    assert job.status == "succeeded" and job.fence is None
    sender.close()
