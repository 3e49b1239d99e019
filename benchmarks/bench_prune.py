"""Pruning N finished tracked jobs on PostgreSQL: ours beside one raw batched DELETE.

Usage: ``.venv/bin/python benchmarks/bench_prune.py [N] [--repeat R]`` (default N = 1,000,000).
Environment: ``JR_BENCH_PG`` (admin URL; a throwaway database is created and dropped).

Both sides delete the same rows in batches of 1,000, each batch its own transaction, and run in
turns within one process (this machine is noisy: compare the ratio, not the seconds). While each
runs, a second connection keeps writing task-tracking rows (one INSERT of a running job, then
its UPDATE to succeeded, each committed), and the latency of those writes is reported
(median, p99, max): a prune must not stall tracking.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from _common import median, throwaway_database
from celery import Celery
from sqlalchemy import create_engine, insert, text, update
from sqlalchemy.engine import Engine

from celery_jobreaper.database import Database
from celery_jobreaper.prune import Pruner, own_targets
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.settings import Settings

BATCH = 1000
RAW = text(
    "DELETE FROM jobreaper_jobs WHERE task_id IN (SELECT task_id FROM jobreaper_jobs "
    "WHERE status IN ('succeeded', 'failed', 'revoked') AND completed_at < :cut "
    "ORDER BY task_id LIMIT :n)"
)


def fill(engine: Engine, n: int) -> None:
    """*n* succeeded tracked jobs finished 40 days ago."""
    old = datetime.utcnow() - timedelta(days=40)
    with engine.begin() as conn:
        for start in range(0, n, 20_000):
            conn.execute(
                insert(tables.jobs),
                [
                    {
                        "task_id": f"{i:09d}-{uuid.uuid4().hex[:8]}",
                        "task_name": "bench",
                        "status": "succeeded",
                        "incarnation_id": "x",
                        "started_at": old,
                        "completed_at": old,
                        "times_reaped": 0,
                    }
                    for i in range(start, min(n, start + 20_000))
                ],
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobreaper_jobs"))


def raw_prune(engine: Engine) -> int:
    """The floor: one hand-written batched DELETE, looped until nothing is left."""
    cut = datetime.utcnow() - timedelta(days=30)
    done = 0
    while True:
        with engine.begin() as conn:
            gone = conn.execute(RAW, {"cut": cut, "n": BATCH}).rowcount
        done += gone
        if gone < BATCH:
            return done


def our_prune(url: str) -> int:
    """celery_jobreaper's pruner over the tracked-jobs table."""
    app = Celery("bench", set_as_current=False)
    app.conf.jobreaper_database_url = url
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    try:
        targets = own_targets(tables, 30 * 86400)[:1]
        return Pruner(db, targets, batch=BATCH, max_rows=10**9).run().total
    finally:
        db.dispose()


def timed_with_writes(engine: Engine, work: Callable[[], int]) -> tuple[float, int, list[float]]:
    """Run *work* while another connection writes tracking rows; seconds, rows, write latencies."""
    stop = threading.Event()
    latencies: list[float] = []

    def writer() -> None:
        with engine.connect() as conn:
            while not stop.is_set():
                task_id = uuid.uuid4().hex
                began = time.perf_counter()
                with conn.begin():
                    conn.execute(
                        insert(tables.jobs).values(
                            task_id=task_id,
                            task_name="live",
                            status="running",
                            started_at=datetime.utcnow(),
                            times_reaped=0,
                        )
                    )
                with conn.begin():
                    conn.execute(
                        update(tables.jobs)
                        .where(tables.jobs.c.task_id == task_id)
                        .values(status="succeeded", completed_at=datetime.utcnow())
                    )
                latencies.append(time.perf_counter() - began)
                time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    began = time.perf_counter()
    rows = work()
    took = time.perf_counter() - began
    stop.set()
    thread.join()
    return took, rows, latencies


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"median {statistics.median(ordered) * 1000:6.2f} ms  p99 {p99 * 1000:6.2f} ms  "
        f"max {ordered[-1] * 1000:7.2f} ms  ({len(ordered)} writes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("n", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    ours: list[float] = []
    floor: list[float] = []
    lat_ours: list[float] = []
    lat_floor: list[float] = []
    with throwaway_database("jrbench_prune") as url:
        engine = create_engine(url)
        create_all(engine)
        for _ in range(args.repeat):
            for label in ("ours", "floor"):
                fill(engine, args.n)
                if label == "ours":
                    took, rows, lat = timed_with_writes(engine, lambda: our_prune(url))
                    ours.append(rows / took)
                    lat_ours += lat
                else:
                    took, rows, lat = timed_with_writes(engine, lambda: raw_prune(engine))
                    floor.append(rows / took)
                    lat_floor += lat
                assert rows == args.n, (label, rows)
        engine.dispose()
    print(f"bench_prune: {args.n:,} finished tracked jobs, batches of {BATCH}, PostgreSQL")
    print(f"  ours  {median(ours):12,.0f} rows/s   (runs: {', '.join(f'{v:,.0f}' for v in ours)})")
    print(
        f"  floor {median(floor):12,.0f} rows/s   (runs: {', '.join(f'{v:,.0f}' for v in floor)})"
    )
    print(f"  ours/floor {median(ours) / median(floor):.2f}   (target >= 0.8)")
    print(f"  tracking writes during ours:  {_ms(lat_ours)}")
    print(f"  tracking writes during floor: {_ms(lat_floor)}")


if __name__ == "__main__":
    main()
