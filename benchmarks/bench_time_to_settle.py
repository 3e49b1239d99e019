"""Time to settle: from SIGKILL of a worker, or of one of its pool processes, to its job failed.

Usage: .venv/bin/python benchmarks/bench_time_to_settle.py [--repeat R] [--repeat-defaults D]

Real ``celery worker`` processes (app ``benchapp.py``, Redis + a throwaway PostgreSQL database,
task tracking on) run a long task (``bench.sleep``); the benchmark SIGKILLs, then polls the
task's row in ``jobreaper_jobs`` every 20 ms until it is ``failed``, and prints the median and
every run beside the bound the design promises:

* a worker dies (its whole process group is SIGKILLed) while another worker runs: the survivor's
  periodic reap settles the job once the dead worker's heartbeat is older than
  ``jobreaper_heartbeat_timeout`` and it did not answer one ping — within ``heartbeat_timeout +
  interval`` (+ ``ping_timeout``) seconds. Measured with short settings (R runs) and with the
  defaults (D runs; each takes up to two minutes).
* one pool process dies (SIGKILL of one prefork child, as the OOM killer does) while the worker
  and a sibling task in its other child live on: within 2 s (DESIGN §8) the job's tracked row
  (the worker's own failure signal, sent once jobreaper's pool watch made Celery look at its
  pool at once) and its user row (``system_jobs`` with owner and task-id columns, by the reap
  the death triggers) must be ``failed``; the sibling's must still be ``running``. The user
  row is measured twice: for a job that ran longer than ``heartbeat_interval`` before the kill,
  and for one killed at once (a row younger than ``heartbeat_interval`` is left by the reap
  right after the death, as its task may only now be taken, and settled by a second reap
  ``heartbeat_interval`` + 0.5 s after the death).

Machines differ and this one is shared: the figures are medians of real runs, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from _common import REDIS_URL, kill_group, median, stop, throwaway_database
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from celery_jobreaper.settings import Settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHORT = {"heartbeat_interval": 1, "heartbeat_timeout": 5, "interval": 2, "ping_timeout": 1}
POOL_BOUND = 2.0  # seconds (DESIGN §8)


class Worker:
    """A real worker subprocess of ``benchapp`` in its own process group."""

    def __init__(self, url: str, name: str, queue: str, settings: dict[str, Any], **kw: Any):
        self.key = f"jrbench-tts-{uuid.uuid4().hex[:8]}"
        env = {
            **({"JR_BENCH_SOURCE": "owned"} if kw.get("user_table") else {}),
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
            "JR_BENCH_BROKER": REDIS_URL,
            "JR_BENCH_DATABASE_URL": url,
            "JR_BENCH_QUEUE": queue,
            "JR_BENCH_COUNTER": self.key,
            "JR_BENCH_READY_KEY": f"{self.key}:ready",
            "JR_BENCH_SETTINGS": json.dumps(settings),
        }
        env.pop("PYTHONWARNINGS", None)
        cmd = [
            *(sys.executable, "-m", "celery", "-A", "benchapp", "worker", "-n", name),
            *("-P", kw.get("pool", "prefork"), "-c", str(kw.get("concurrency", 1))),
            *("-l", "warning", "--without-mingle", "--without-gossip"),
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=HERE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, client: redis.Redis[Any]) -> None:
        _poll(lambda: client.exists(f"{self.key}:ready"), 120, "worker ready", self.proc)

    def pid_of(self, client: redis.Redis[Any], task_id: str) -> int:
        got = _poll(lambda: client.get(f"{self.key}:pid:{task_id}"), 60, "task started")
        return int(got)


def _poll(predicate: Callable[[], Any], timeout: float, what: str, proc: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise SystemExit(f"bench_time_to_settle: timed out waiting for: {what}")
        time.sleep(0.02)


def _status(engine: Engine, task_id: str, table: str = "jobreaper_jobs") -> str | None:
    with engine.connect() as conn:
        row = conn.execute(
            text(f"SELECT status FROM {table} WHERE task_id = :t"),  # our two table names
            {"t": task_id},
        ).first()
    return None if row is None else str(row[0])


def _send(queue: str, seconds: float, task: str = "bench.sleep") -> str:
    os.environ["JR_BENCH_QUEUE"] = queue
    os.environ["JR_BENCH_BROKER"] = REDIS_URL  # the workers' broker (JR_BENCH_REDIS)
    from benchapp import app

    return str(app.send_task(task, args=(seconds,), queue=queue).id)


USER_TABLE = """
CREATE TABLE IF NOT EXISTS system_jobs (
    job_id VARCHAR(64) PRIMARY KEY, job_type VARCHAR(64), status VARCHAR(16) NOT NULL,
    started_at TIMESTAMP, completed_at TIMESTAMP, error TEXT,
    owner VARCHAR(191), task_id VARCHAR(191)
)
"""


def _settle_time(engine: Engine, task_id: str, limit: float) -> float | None:
    """Seconds until the job's row is failed (polled every 20 ms), ``None`` past *limit*."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        if _status(engine, task_id) == "failed":
            return time.monotonic() - began
        time.sleep(0.02)
    return None


def worker_death(url: str, settings: dict[str, Any], client: redis.Redis[Any]) -> float | None:
    """SIGKILL a worker mid-task while another runs; seconds until the job is failed."""
    tag = uuid.uuid4().hex[:6]
    engine = create_engine(url)
    survivor = Worker(url, f"survivor-{tag}@bench", f"jrbench-s-{tag}", settings)
    victim = Worker(url, f"victim-{tag}@bench", f"jrbench-v-{tag}", settings)
    try:
        survivor.wait_ready(client)
        victim.wait_ready(client)
        task_id = _send(f"jrbench-v-{tag}", 600)
        victim.pid_of(client, task_id)
        _poll(lambda: _status(engine, task_id) == "running", 30, "job tracked as running")
        kill_group(victim.proc)
        bound = _bound(settings)
        return _settle_time(engine, task_id, bound * 2 + 30)
    finally:
        kill_group(victim.proc)
        stop(survivor.proc, timeout=30)
        engine.dispose()


def pool_death(
    url: str, settings: dict[str, Any], client: redis.Redis[Any], ran: float = 0.0
) -> tuple[float | None, float | None, bool]:
    """SIGKILL one prefork child once its job ran *ran* seconds; seconds until its tracked job
    and its user row are failed, and whether the sibling's are still running."""
    tag = uuid.uuid4().hex[:6]
    engine = create_engine(url)
    queue = f"jrbench-p-{tag}"
    worker = Worker(url, f"pool-{tag}@bench", queue, settings, concurrency=2, user_table=True)
    try:
        worker.wait_ready(client)
        victim, sibling = _send(queue, 600, "bench.job"), _send(queue, 600, "bench.job")
        pid = worker.pid_of(client, victim)
        worker.pid_of(client, sibling)
        for task_id in (victim, sibling):
            _poll(lambda t=task_id: _status(engine, t) == "running", 30, "jobs tracked")
        time.sleep(ran)
        os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        took: dict[str, float | None] = {"jobreaper_jobs": None, "system_jobs": None}
        while time.monotonic() - began < 30 and None in took.values():
            for table in [t for t, v in took.items() if v is None]:
                if _status(engine, victim, table) == "failed":
                    took[table] = time.monotonic() - began
            time.sleep(0.02)
        alive = all(_status(engine, sibling, t) == "running" for t in took)
        return took["jobreaper_jobs"], took["system_jobs"], alive
    finally:
        stop(worker.proc, timeout=5)
        engine.dispose()


def _bound(settings: dict[str, Any]) -> float:
    s = _settings(settings)
    return s.heartbeat_timeout + s.interval + s.ping_timeout


def _settings(settings: dict[str, Any]) -> Settings:
    from celery import Celery

    app = Celery("bound", set_as_current=False)
    app.conf.jobreaper_database_url = "sqlite://"
    for key, value in settings.items():
        app.conf[f"jobreaper_{key}"] = value
    return Settings.from_app(app)


def _line(label: str, runs: list[float | None], bound: float) -> str:
    done = [r for r in runs if r is not None]
    missed = len(runs) - len(done)
    text_runs = " ".join("never" if r is None else f"{r:.2f}" for r in runs)
    mid = f"{median(done):7.2f} s" if done else "      - "
    extra = f"; {missed} run(s) NOT settled in time" if missed else ""
    return (
        f"  {label:<34} median {mid}  bound {bound:6.1f} s  "
        f"median/bound {median(done) / bound if done else float('nan'):.2f}   "
        f"runs: {text_runs}{extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="runs with short settings")
    parser.add_argument(
        "--repeat-defaults", type=int, default=3, help="worker-death runs with default settings"
    )
    args = parser.parse_args()
    client: redis.Redis[Any] = redis.Redis.from_url(REDIS_URL)
    results: dict[str, list[float | None]] = {
        k: [] for k in ("short", "defaults", "tracked", "row_old", "row_young")
    }
    siblings_alive = 0
    ran = _settings(SHORT).heartbeat_interval + 0.5
    try:
        with throwaway_database("jrbench_tts") as url:
            setup = create_engine(url)
            with setup.begin() as conn:
                conn.execute(text(USER_TABLE))
            setup.dispose()
            for _ in range(args.repeat):
                results["short"].append(worker_death(url, SHORT, client))
                tracked, row, alive = pool_death(url, SHORT, client, ran=ran)
                results["tracked"].append(tracked)
                results["row_old"].append(row)
                siblings_alive += alive
                tracked, row, alive = pool_death(url, SHORT, client)
                results["tracked"].append(tracked)
                results["row_young"].append(row)
                siblings_alive += alive
            for _ in range(args.repeat_defaults):
                results["defaults"].append(worker_death(url, {}, client))
    finally:
        for key in client.scan_iter("jrbench-tts-*"):
            client.delete(key)
        client.close()
    short = ", ".join(f"{k}={v}" for k, v in SHORT.items())
    defaults = _settings({})
    print("bench_time_to_settle: SIGKILL -> tracked job 'failed' (Redis + PostgreSQL, prefork)")
    print(f"  short settings: {short} (seconds)")
    print(
        f"  defaults: heartbeat_interval={defaults.heartbeat_interval:g}, "
        f"heartbeat_timeout={defaults.heartbeat_timeout:g}, interval={defaults.interval:g}, "
        f"ping_timeout={defaults.ping_timeout:g} (seconds)"
    )
    print(_line("worker killed, short settings", results["short"], _bound(SHORT)))
    if results["defaults"]:
        print(_line("worker killed, default settings", results["defaults"], _bound({})))
    print(_line("pool process killed: tracked job", results["tracked"], POOL_BOUND))
    print(_line(f"  user row, job ran {ran:g} s", results["row_old"], POOL_BOUND))
    print(_line("  user row, job killed at once", results["row_young"], POOL_BOUND))
    print(
        "  (a user row younger than heartbeat_interval is settled by the reap "
        "heartbeat_interval + 0.5 s after the death)"
    )
    print(
        "  sibling task's tracked job and user row still running after the pool kill: "
        f"{siblings_alive}/{2 * args.repeat}"
    )


if __name__ == "__main__":
    main()
