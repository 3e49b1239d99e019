"""Task throughput through a real prefork worker with tracked jobs on vs off.

Each round: empty the queue, enqueue N ``bench.noop`` tasks (each does one Redis INCR of a
counter and nothing else), start a real ``celery worker -P prefork -c 2 -l warning`` (Redis
db 14 broker, a fresh PostgreSQL database for jobreaper) and time from its ``worker_ready``
signal (it sets a Redis key) until the counter reaches N; then warm-shut it down. Rounds
alternate ``jobreaper_track_tasks`` True / False (same app, same plugin, only that setting
differs) and the order flips every round.

Printed: median tasks/s of each and the ratio on/off (target >= 0.8), and the tracked rows
(every task recorded as succeeded, none left running).

    python benchmarks/bench_tracking.py               # 2000 tasks, 5 rounds of each
    python benchmarks/bench_tracking.py 500 2         # quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import redis
from _common import REDIS_URL, kill_group, median, stop, throwaway_database
from sqlalchemy import create_engine, text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def enqueue(queue: str, n: int) -> None:
    """Put *n* ``bench.noop`` messages on *queue* (producer only: the app module, no worker)."""
    os.environ["JR_BENCH_QUEUE"] = queue
    os.environ["JR_BENCH_BROKER"] = REDIS_URL  # the workers' broker (JR_BENCH_REDIS)
    from benchapp import app

    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task("bench.noop", queue=queue, producer=producer)


def run_round(url: str, track: bool, n: int, queue: str, counter: str) -> float:
    """Start a worker on *n* queued tasks; return tasks/s from its being ready to the last."""
    client = redis.Redis.from_url(REDIS_URL)
    ready_key = f"{counter}:ready"
    client.delete(counter, ready_key)
    enqueue(queue, n)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
        "JR_BENCH_BROKER": REDIS_URL,
        "JR_BENCH_DATABASE_URL": url,
        "JR_BENCH_QUEUE": queue,
        "JR_BENCH_TRACK": "1" if track else "0",
        "JR_BENCH_COUNTER": counter,
        "JR_BENCH_READY_KEY": ready_key,
    }
    env.pop("PYTHONWARNINGS", None)
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchapp",
        "worker",
        "-n",
        f"bench-tracking-{'on' if track else 'off'}@%h",
        "-P",
        "prefork",
        "-c",
        "2",
        "-l",
        "warning",
        "--without-mingle",
        "--without-gossip",
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        log.extend(raw.decode(errors="replace") for raw in proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.perf_counter() + 120
        while not client.exists(ready_key):
            if time.perf_counter() > deadline or proc.poll() is not None:
                raise SystemExit(f"worker not ready:\n{''.join(log)}")
            time.sleep(0.005)
        began = time.perf_counter()
        deadline = began + 600
        while int(client.get(counter) or 0) < n:
            if time.perf_counter() > deadline or proc.poll() is not None:
                raise SystemExit(f"tasks did not finish:\n{''.join(log)}")
            time.sleep(0.005)
        elapsed = time.perf_counter() - began
        stop(proc, timeout=60)
        return n / elapsed
    finally:
        kill_group(proc)
        reader.join(timeout=5)
        client.close()


def tracked_rows(url: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) FROM jobreaper_jobs GROUP BY status"))
        counts = {status: count for status, count in rows}
    engine.dispose()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="?", type=int, default=2000, help="tasks per round")
    parser.add_argument("rounds", nargs="?", type=int, default=5, help="rounds of each setting")
    args = parser.parse_args()
    queue = f"jrbench-{uuid.uuid4().hex[:8]}"
    counter = f"{queue}:done"
    rates: dict[bool, list[float]] = {True: [], False: []}
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    try:
        with throwaway_database() as url:
            run_round(url, True, min(args.tasks, 200), queue, counter)  # warm-up, makes tables
            run_round(url, False, min(args.tasks, 200), queue, counter)
            for i in range(args.rounds):
                for track in (True, False) if i % 2 == 0 else (False, True):
                    rates[track].append(run_round(url, track, args.tasks, queue, counter))
            rows = tracked_rows(url)
    finally:
        client.flushdb()
        client.close()
    on, off = median(rates[True]), median(rates[False])
    print(
        f"bench_tracking: {args.tasks} noop tasks per round, {args.rounds} rounds each, "
        "prefork -c 2, Redis + PostgreSQL"
    )
    for track in (True, False):
        runs = " ".join(f"{r:.0f}" for r in rates[track])
        print(
            f"  track_tasks={track!s:<5} median {median(rates[track]):7.0f} tasks/s   runs: {runs}"
        )
    print(f"  ratio on/off = {on / off:.2f}  (target >= 0.8)")
    print(f"  jobreaper_jobs rows by status: {rows}")


if __name__ == "__main__":
    main()
