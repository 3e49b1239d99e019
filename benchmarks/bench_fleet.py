"""Steady-state cost of a cluster: control broadcasts, database transactions and rows written per
minute, for N real workers and for a simulated fleet of incarnations (issue 9).

Real workers: N ``celery worker -P solo`` (app ``benchapp.py``) on Redis + a fresh PostgreSQL
database, heartbeat every 2 s, reap every 5 s (the issue's measurement), a few long tasks in
flight (each solo worker prefetches: those messages sit in Redis's ``unacked`` hash, so the
leader's sweep asks the holders every cycle). Measured over a window once every worker is
ready: Redis ``PUBLISH`` calls on this benchmark's db index (``MONITOR``: control broadcasts
are fanout publishes; replies are list pushes, not counted), and the fresh database's
``xact_commit + xact_rollback`` and ``n_tup_ins + n_tup_upd + n_tup_del`` deltas
(``pg_stat_database``, ``pg_stat_user_tables``).

Simulated fleet: M incarnations registered in a fresh database; every heartbeat interval each
one heartbeats and contends for the lease exactly as a worker's heartbeat thread does
(``ReaperService.beat``); one of them (this process, with a real Celery app on Redis) leads
and runs the periodic reap every interval. Also printed: the leader's idle cycle (median
seconds, SQL statements).

    .venv/bin/python benchmarks/bench_fleet.py                    # N = 2 4 8, M = 100 1000
    .venv/bin/python benchmarks/bench_fleet.py --window 20 --workers 2 4 --simulated 100
    .venv/bin/python benchmarks/bench_fleet.py --baseline /tmp/old   # old tree's workers too
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from _common import REDIS_URL, median, stop, throwaway_database
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

HERE = Path(__file__).parent
ROOT = HERE.parent
DB_INDEX = int(REDIS_URL.rsplit("/", 1)[1]) if REDIS_URL.rsplit("/", 1)[1].isdigit() else 0
#: the issue's measurement: heartbeat 2 s, interval 5 s
SETTINGS = {
    "heartbeat_interval": 2,
    "heartbeat_timeout": 10,
    "interval": 5,
    "unacked_grace": 1,
    "ping_timeout": 0.5,
}
#: the thread that runs the simulated leader's periodic reaps
LEADING = "jrfleet-leading"
#: the simulated fleet runs with the defaults' cadence (heartbeat 5 s, reap every 10 s): a
#: thousand incarnations beating every 2 s would need more than this process can send
SIMULATED = {**SETTINGS, "heartbeat_interval": 5, "heartbeat_timeout": 20, "interval": 10}


class PublishCounter:
    """Counts ``PUBLISH`` commands sent on db *index* (Redis ``MONITOR``) while running."""

    def __init__(self, url: str, index: int) -> None:
        self.client = redis.Redis.from_url(url)
        self.pattern = re.compile(rf'^\S+ \[{index} [^\]]+\] "PUBLISH"', re.IGNORECASE)
        self.count = 0
        self._stop = threading.Event()
        self._counting = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            connection = monitor.connection
            assert connection is not None
            while not self._stop.is_set():
                line = connection.read_response()
                if isinstance(line, bytes):
                    line = line.decode(errors="replace")
                if self._counting.is_set() and self.pattern.match(str(line)):
                    self.count += 1

    def start(self) -> None:
        self.count = 0
        self._counting.set()

    def stop(self) -> int:
        self._counting.clear()
        return self.count

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.ping()  # one more line for the monitor to read, so it sees the stop
        self._thread.join(timeout=5)
        self.client.close()


def _db_counters(engine: Engine, name: str) -> tuple[int, int]:
    """(transactions, rows written) of database *name* so far (its statistics views)."""
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        xacts = conn.execute(
            text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
            {"d": name},
        ).scalar_one()
        rows = conn.execute(
            text(
                "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) "
                "FROM pg_stat_user_tables"
            )
        ).scalar_one()
    return int(xacts), int(rows)


@contextlib.contextmanager
def _measuring(url: str) -> Iterator[Engine]:
    engine = create_engine(url, pool_size=1)
    try:
        yield engine
    finally:
        engine.dispose()


def _window(
    engine: Engine, name: str, publishes: PublishCounter, window: float
) -> tuple[float, float, float]:
    """Per minute over *window* seconds: broadcasts, transactions, rows written."""
    time.sleep(1.5)  # let the backends flush their statistics (PostgreSQL: at most every 1 s)
    x0, r0 = _db_counters(engine, name)
    publishes.start()
    began = time.monotonic()
    time.sleep(window)
    sent = publishes.stop()
    elapsed = time.monotonic() - began
    time.sleep(1.5)
    x1, r1 = _db_counters(engine, name)
    per_minute = 60.0 / elapsed
    # the measuring connection's own transaction (the first reading's) is taken out
    return sent * per_minute, max(x1 - x0 - 1, 0) * per_minute, (r1 - r0) * per_minute


def real_workers(
    n: int, window: float, publishes: PublishCounter, tree: Path
) -> tuple[float, float, float]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    procs: list[subprocess.Popen[bytes]] = []
    with throwaway_database("jrfleet") as url, _measuring(url) as engine:
        name = url.rsplit("/", 1)[1]
        key = f"jrfleet:{uuid.uuid4().hex[:8]}"
        queue = f"jrfleet-{uuid.uuid4().hex[:8]}"
        try:
            for i in range(n):
                env = {
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(HERE), str(tree)]),
                    "JR_BENCH_BROKER": REDIS_URL,
                    "JR_BENCH_DATABASE_URL": url,
                    "JR_BENCH_QUEUE": queue,
                    "JR_BENCH_COUNTER": key,
                    "JR_BENCH_READY_KEY": f"{key}:ready:{i}",
                    "JR_BENCH_SETTINGS": json.dumps(SETTINGS),
                }
                env.pop("PYTHONWARNINGS", None)
                cmd = [
                    *(sys.executable, "-m", "celery", "-A", "benchapp", "worker"),
                    *("-n", f"fleet{i}-{key[-8:]}@h", "-P", "solo", "-l", "warning"),
                    *("--without-mingle", "--without-gossip"),
                ]
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        cwd=HERE,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + 120
            while not all(client.exists(f"{key}:ready:{i}") for i in range(n)):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit(f"bench_fleet: {n} workers did not all start")
                time.sleep(0.1)
            os.environ["JR_BENCH_BROKER"] = REDIS_URL
            from benchapp import app

            for _ in range(max(2, n)):  # tasks in flight, some held prefetched (unacked)
                app.send_task("bench.sleep", args=(3600,), queue=queue)
            time.sleep(2 * SETTINGS["interval"])  # past startup reaps, a leader chosen
            return _window(engine, name, publishes, window)
        finally:
            for proc in procs:
                stop(proc, timeout=1)  # (their tasks sleep for an hour: SIGKILL after 1 s)
            client.flushdb()
            client.close()


def simulated(m: int, window: float, publishes: PublishCounter) -> tuple[float, float, float, Any]:
    from celery import Celery

    from celery_jobreaper.database import Database
    from celery_jobreaper.lease import Lease
    from celery_jobreaper.liveness import Incarnation
    from celery_jobreaper.reaper import Reaper
    from celery_jobreaper.schema import create_all, tables
    from celery_jobreaper.service import ReaperService
    from celery_jobreaper.settings import Settings
    from celery_jobreaper.sweep import BrokerSweep
    from celery_jobreaper.vocabulary import PERIODIC

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    with throwaway_database("jrfleet") as url, _measuring(url) as engine:
        name = url.rsplit("/", 1)[1]
        app = Celery(f"jrfleet-{m}", broker=REDIS_URL, set_as_current=False)
        app.conf.jobreaper_database_url = url
        for k, v in SIMULATED.items():
            app.conf[f"jobreaper_{k}"] = v
        # the defaults (pool_pre_ping: one more "transaction" per checkout), a larger pool
        app.conf.jobreaper_engine_options = {
            "pool_pre_ping": True,
            "pool_recycle": 3600,
            "pool_size": 8,
            "max_overflow": 8,
        }
        settings = Settings.from_app(app)
        db = Database.from_settings(settings)
        create_all(db.engine, tables)
        statements = [0]

        @event.listens_for(db.engine, "before_cursor_execute")
        def _count(*_: Any) -> None:
            if threading.current_thread().name == LEADING:  # the leader's reaps only
                statements[0] += 1

        def service(i: int) -> ReaperService:
            me = Incarnation.new(f"sim{i}@h")
            lease = Lease(db, tables, holder=me.id, node=me.node, timeout=settings.lease_timeout)
            if i == 0:  # the leader: a whole reaper, with its sweep
                sweep = BrokerSweep(app, settings, db, tables, lambda: ["celery"])
                reaper = Reaper(app, settings, db, me=me, sweep=sweep, fence=lease.fence)
            else:
                reaper = shared
            return ReaperService(reaper, me, lease=lease)

        shared = Reaper(app, settings, db)
        fleet = [service(i) for i in range(m)]
        for s in fleet:
            s.register()
        leader = fleet[0]
        leader.beat()
        assert leader.lease is not None and leader.lease.leads
        stop_flag = threading.Event()
        cycles: list[tuple[float, int]] = []
        beats = [0]

        def beating(part: list[ReaperService]) -> None:
            every = SIMULATED["heartbeat_interval"]
            while not stop_flag.is_set():
                began = time.monotonic()
                for s in part:
                    s.beat()
                    beats[0] += 1
                stop_flag.wait(max(0.0, every - (time.monotonic() - began)))

        def leading() -> None:
            while not stop_flag.is_set():
                before = statements[0]
                began = time.perf_counter()
                leader.reaper.run(PERIODIC)
                cycles.append((time.perf_counter() - began, statements[0] - before))
                stop_flag.wait(SIMULATED["interval"])

        threads = [
            threading.Thread(target=beating, args=(fleet[i::4],), daemon=True) for i in range(4)
        ] + [threading.Thread(target=leading, daemon=True, name=LEADING)]
        for t in threads:
            t.start()
        try:
            time.sleep(SIMULATED["interval"])
            counted = beats[0]
            began = time.monotonic()
            figures = _window(engine, name, publishes, window)
            rate = (beats[0] - counted) * 60.0 / (time.monotonic() - began) / m
        finally:
            stop_flag.set()
            for t in threads:
                t.join(timeout=60)
            db.dispose()
            client.flushdb()
            client.close()
        idle = (median([c[0] for c in cycles]), median([float(c[1]) for c in cycles]), rate)
        return (*figures, idle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured per size")
    parser.add_argument("--workers", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--simulated", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--baseline", type=Path, help="a source tree of another version")
    args = parser.parse_args()
    publishes = PublishCounter(REDIS_URL, DB_INDEX)
    rows: list[tuple[str, int, float, float, float, str]] = []
    try:
        trees = [("this", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
        for label, tree in trees:
            for n in args.workers:
                b, x, w = real_workers(n, args.window, publishes, tree)
                rows.append((f"{label}: {n} workers", n, b, x, w, ""))
                print(f"  measured {rows[-1][0]}", file=sys.stderr)
        for m in args.simulated:
            b, x, w, (secs, stmts, rate) = simulated(m, args.window, publishes)
            due = 60.0 / SIMULATED["heartbeat_interval"]
            note = (
                f"leader idle cycle: {secs * 1000:.1f} ms, {stmts:.0f} statements; "
                f"heartbeats {rate:.1f}/min per incarnation (due {due:g})"
            )
            rows.append((f"simulated: {m} incarnations", m, b, x, w, note))
            print(f"  measured {rows[-1][0]}", file=sys.stderr)
    finally:
        publishes.close()
    print(
        f"\nper minute, over {args.window:g} s windows; real workers: heartbeat "
        f"{SETTINGS['heartbeat_interval']} s, reap every {SETTINGS['interval']} s; simulated: "
        f"heartbeat {SIMULATED['heartbeat_interval']} s, reap every {SIMULATED['interval']} s"
    )
    head = ("fleet", "broadcasts", "/worker", "db xacts", "/worker", "rows", "/worker")
    print(f"{head[0]:32} " + " ".join(f"{h:>10}" for h in head[1:]))
    for label, n, b, x, w, note in rows:
        cells = (b, b / n, x, x / n, w, w / n)
        print(
            f"{label:32} " + " ".join(f"{c:10.1f}" for c in cells) + (f"   {note}" if note else "")
        )
    by = {label: (b, x / n) for label, n, b, x, _w, _ in rows}
    for label, _tree in [("this", ROOT)] + ([("baseline", None)] if args.baseline else []):
        if not args.workers:
            break
        lo, hi = f"{label}: {min(args.workers)} workers", f"{label}: {max(args.workers)} workers"
        if lo in by and hi in by and lo != hi:
            print(
                f"{label}: broadcasts/min at N={max(args.workers)} / N={min(args.workers)}: "
                f"{by[hi][0] / max(by[lo][0], 1e-9):.2f} (target <= 2); db xacts per worker: "
                f"{by[hi][1] / max(by[lo][1], 1e-9):.2f} (target ~1, flat)"
            )


if __name__ == "__main__":
    main()
