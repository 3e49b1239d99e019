"""The Celery app the worker benchmarks start, configured by environment variables.

Like a real application it imports SQLAlchemy and psycopg (and makes its own engine) at import
time, whether or not the plugin runs, so the benchmarks compare the plugin's work only.

JR_BENCH_BROKER        broker URL (default redis://127.0.0.1:6379/14)
JR_BENCH_DATABASE_URL  jobreaper_database_url (and the app's own engine)
JR_BENCH_QUEUE         default queue name (default ``jrbench``)
JR_BENCH_TRACK         "1" / "0": jobreaper_track_tasks (default "1")
JR_BENCH_SOURCE        "1": add the seed-shaped ``system_jobs`` table as a source; "owned": the
                       same with its ``owner`` and ``task_id`` columns (``bench.job`` writes them)
JR_BENCH_INSTALL       "0": do not install celery_jobreaper at all
JR_BENCH_COUNTER       Redis key the ``bench.noop`` task increments (default ``jrbench:done``)
JR_BENCH_READY_KEY     Redis key set when the worker is ready (so it can log at WARNING)
JR_BENCH_SETTINGS      JSON of extra ``jobreaper_*`` settings, keys without the prefix
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import psycopg  # noqa: F401  (a real app has its driver imported)
import sqlalchemy
from celery import Celery, signals

BROKER = os.environ.get("JR_BENCH_BROKER", "redis://127.0.0.1:6379/14")
DATABASE_URL = os.environ.get("JR_BENCH_DATABASE_URL", "")
COUNTER = os.environ.get("JR_BENCH_COUNTER", "jrbench:done")
READY_KEY = os.environ.get("JR_BENCH_READY_KEY")

app = Celery("benchapp", broker=BROKER)
app.conf.update(
    task_default_queue=os.environ.get("JR_BENCH_QUEUE", "jrbench"),
    broker_connection_retry_on_startup=True,
    jobreaper_database_url=DATABASE_URL or None,
    jobreaper_track_tasks=os.environ.get("JR_BENCH_TRACK", "1") == "1",
)
for key, value in json.loads(os.environ.get("JR_BENCH_SETTINGS", "{}")).items():
    app.conf[f"jobreaper_{key}"] = value
if os.environ.get("JR_BENCH_SOURCE") in ("1", "owned"):
    owned = os.environ["JR_BENCH_SOURCE"] == "owned"
    app.conf.jobreaper_sources = [
        {
            "table": "system_jobs",
            "id": "job_id",
            "status": "status",
            "kind": "job_type",
            "started_at": "started_at",
            "completed_at": "completed_at",
            "error": "error",
            **({"owner": "owner", "task_id": "task_id"} if owned else {}),
        }
    ]
if os.environ.get("JR_BENCH_INSTALL", "1") != "0":
    import celery_jobreaper

    celery_jobreaper.install(app)

#: The application's own engine, as a real app would have (connects lazily).
engine = sqlalchemy.create_engine(DATABASE_URL) if DATABASE_URL else None

_redis: Any = None


def _counter() -> Any:
    """A Redis client of this (pool) process, made on first use, after the fork."""
    global _redis  # noqa: PLW0603
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(BROKER)
    return _redis


@app.task(name="bench.noop")
def noop() -> None:
    """Count one completion (one Redis INCR) and nothing else."""
    _counter().incr(COUNTER)


@app.task(name="bench.sleep", bind=True)
def sleep(self: Any, seconds: float) -> None:
    """Publish this pool process's pid under the task id, then sleep (a long job to kill)."""
    _counter().set(f"{COUNTER}:pid:{self.request.id}", os.getpid())
    time.sleep(seconds)


@app.task(name="bench.job", bind=True)
def job(self: Any, seconds: float) -> None:
    """A user job: its ``system_jobs`` row (id = task id, owner = this worker) written running,
    then this process's pid published under the task id, then a sleep (a long job to kill)."""
    from datetime import datetime, timezone

    assert engine is not None
    with engine.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                "INSERT INTO system_jobs (job_id, job_type, status, started_at, owner, task_id)"
                " VALUES (:id, 'bench', 'running', :now, :owner, :id)"
            ),
            {
                "id": self.request.id,
                "now": datetime.now(timezone.utc).replace(tzinfo=None),
                "owner": self.request.hostname,
            },
        )
    _counter().set(f"{COUNTER}:pid:{self.request.id}", os.getpid())
    time.sleep(seconds)


@signals.worker_ready.connect
def _announce_ready(**_: Any) -> None:
    if READY_KEY:
        _counter().set(READY_KEY, time.time())
