"""Settle N stale rows of a user job table: celery_jobreaper vs one raw statement vs an ORM loop.

The table has the seed's shape (``system_jobs``: job_id, job_type, status, started_at,
completed_at, error) and holds N stale rows ('running', started a day ago) interleaved with N
finished ones. Each method runs in a fresh subprocess on an identically rebuilt table
(TRUNCATE, INSERT … SELECT generate_series, VACUUM ANALYZE, CHECKPOINT), and the results are
checked (every stale row failed, one ledger event each where the method writes a ledger):

- ours:  ``celery_jobreaper.reap(app)`` with the table as a source, no live workers, ``memory://``
- floor: one statement, ``WITH u AS (UPDATE … RETURNING …) INSERT INTO jobreaper_events …``
- orm:   the seed's way: an ORM session loads every stale row, sets attributes, commits

Printed: rows/s of each, the ratios ours/floor and ours/orm measured in this same run, and the
memory of our reap per N (maxrss growth of the subprocess during the reap, and a separate,
untimed run under tracemalloc) to show it is flat in N.

    python benchmarks/bench_settle.py                 # N = 100000 and 1000000
    python benchmarks/bench_settle.py 20000           # quick
    python benchmarks/bench_settle.py 100000 1000000 --repeat 3 --orm-max 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from datetime import datetime, timezone
from typing import Any

from _common import median, throwaway_database
from sqlalchemy import DateTime, String, Text, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

STALE = ("running", "scheduled")
SOURCE = {
    "table": "system_jobs",
    "id": "job_id",
    "status": "status",
    "kind": "job_type",
    "started_at": "started_at",
    "completed_at": "completed_at",
    "error": "error",
}
CREATE_TABLE = """
CREATE TABLE system_jobs (
    job_id varchar(64) PRIMARY KEY,
    job_type varchar(64) NOT NULL,
    status varchar(16) NOT NULL,
    started_at timestamp,
    completed_at timestamp,
    error text
)
"""
POPULATE = """
INSERT INTO system_jobs (job_id, job_type, status, started_at, completed_at, error)
SELECT format('job_%s', lpad(i::text, 8, '0')),
       (ARRAY['library_scan', 'file_identification', 'titledb_update'])[1 + i % 3],
       CASE WHEN i % 2 = 0 THEN 'running' ELSE 'completed' END,
       (now() AT TIME ZONE 'utc') - interval '1 day' - (i % 3600) * interval '1 second',
       CASE WHEN i % 2 = 0 THEN NULL
            ELSE (now() AT TIME ZONE 'utc') - interval '1 day' + interval '1 minute' END,
       NULL
FROM generate_series(1, :rows) AS i
"""
# The floor: one statement doing the same row updates and ledger rows, all in the server.
FLOOR = """
WITH u AS (
    UPDATE system_jobs
    SET status = 'failed',
        completed_at = now() AT TIME ZONE 'utc',
        error = 'Job reset by jobreaper: it was ' || status || ' for '
                || date_trunc('second', (now() AT TIME ZONE 'utc') - started_at)::text
                || ' with no live worker left that could be running it. This usually means the '
                || 'worker was killed (SIGKILL, out of memory, eviction, deploy) while the job '
                || 'was in progress.'
    WHERE status IN ('running', 'scheduled')
    RETURNING job_id, job_type, error
)
INSERT INTO jobreaper_events
    (run_id, at, source, job_id, task_id, kind, previous_status, new_status, action, reason,
     owner)
SELECT NULL, now() AT TIME ZONE 'utc', 'system_jobs', job_id, NULL, job_type, 'running',
       'failed', 'settled', error, NULL
FROM u
"""


class Base(DeclarativeBase):
    pass


class SystemJob(Base):
    """The seed's model."""

    __tablename__ = "system_jobs"
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)


# --- children: each method runs in a fresh process; it prints one JSON line ------------------


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_ours(url: str, trace: bool, batch_size: int | None) -> dict[str, Any]:
    from celery import Celery

    import celery_jobreaper

    app = Celery("bench_settle", broker="memory://")
    app.conf.update(
        jobreaper_database_url=url,
        jobreaper_sources=[SOURCE],
        jobreaper_track_tasks=False,
    )
    if batch_size:
        app.conf.jobreaper_batch_size = batch_size
    rss_before = _maxrss_kib()
    if trace:
        tracemalloc.start()
    began = time.perf_counter()
    report = celery_jobreaper.reap(app)
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    return {
        "seconds": seconds,
        "rows": report.settled,
        "rss_growth_kib": _maxrss_kib() - rss_before,
        "tracemalloc_peak": peak,
    }


def child_floor(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.commit()
        began = time.perf_counter()
        with conn.begin():
            rows = conn.execute(text(FLOOR)).rowcount
        seconds = time.perf_counter() - began
    engine.dispose()
    return {"seconds": seconds, "rows": rows}


def child_orm(url: str) -> dict[str, Any]:
    """The seed's loop: load every stale job as an object, set its attributes, commit."""
    engine = create_engine(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    rss_before = _maxrss_kib()
    began = time.perf_counter()
    with Session(engine) as session:
        now = datetime.now(timezone.utc).replace(tzinfo=None)  # the seed's naive UTC
        stale = session.scalars(select(SystemJob).where(SystemJob.status.in_(STALE))).all()
        for job in stale:
            job.status = "failed"
            job.completed_at = now
            age = now - job.started_at if job.started_at else None
            job.error = (
                f"Job reset during startup (was running for {str(age).split('.')[0]}). This "
                "usually means the container was restarted while the job was in progress."
            )
        session.commit()
    seconds = time.perf_counter() - began
    engine.dispose()
    return {"seconds": seconds, "rows": len(stale), "rss_growth_kib": _maxrss_kib() - rss_before}


# --- parent ------------------------------------------------------------------------------


def setup(url: str) -> None:
    from celery_jobreaper.schema import create_all

    engine = create_engine(url)
    create_all(engine)
    with engine.begin() as conn:
        conn.execute(text(CREATE_TABLE))
    engine.dispose()


def rebuild(url: str, n: int) -> None:
    """Empty the job table and the ledger and fill the job table anew: N stale, N finished."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("TRUNCATE system_jobs, jobreaper_events, jobreaper_runs"))
        conn.execute(text(POPULATE), {"rows": 2 * n})
        conn.execute(text("VACUUM ANALYZE system_jobs"))
        conn.execute(text("VACUUM ANALYZE jobreaper_events"))
        conn.execute(text("CHECKPOINT"))
    engine.dispose()


def check(url: str, n: int, method: str) -> None:
    """Every stale row is failed with an error naming its age; ledger rows match."""
    engine = create_engine(url)
    with engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM system_jobs WHERE status = 'running'"))
        failed = conn.execute(
            text(
                "SELECT count(*) FROM system_jobs WHERE status = 'failed' AND error LIKE '%1 day%'"
            )
        )
        events = conn.execute(text("SELECT count(*) FROM jobreaper_events")).scalar_one()
        left_n, failed_n = left.scalar_one(), failed.scalar_one()
    engine.dispose()
    want_events = 0 if method == "orm" else n
    if left_n or failed_n != n or events != want_events:
        raise SystemExit(
            f"{method}: wrong result: {left_n} still running, {failed_n} failed, "
            f"{events} ledger events (expected 0, {n}, {want_events})"
        )


def run_child(
    url: str, method: str, n: int, trace: bool = False, batch_size: int | None = None
) -> dict[str, Any]:
    rebuild(url, n)
    cmd = [sys.executable, __file__, "--child", method, "--url", url]
    if trace:
        cmd.append("--trace")
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{method} (N={n}) failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rows"] != n:
        raise SystemExit(f"{method}: settled {result['rows']} rows, expected {n}")
    check(url, n, method)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=1, help="runs per method and size")
    parser.add_argument(
        "--orm-max", type=int, default=None, help="largest N for the ORM loop (default: estimate)"
    )
    parser.add_argument(
        "--orm-budget",
        type=float,
        default=300.0,
        help="skip an ORM run expected to exceed this (s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="jobreaper_batch_size (default: its default)"
    )
    parser.add_argument("--child", choices=["ours", "floor", "orm"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "ours":
            result = child_ours(args.url, args.trace, args.batch_size)
        elif args.child == "floor":
            result = child_floor(args.url)
        else:
            result = child_orm(args.url)
        print(json.dumps(result))
        return

    batch = args.batch_size or "default"
    print(
        f"bench_settle: sizes {args.sizes}, repeat {args.repeat}, jobreaper_batch_size {batch}; "
        "rows/s are medians"
    )
    with throwaway_database() as url:
        setup(url)
        orm_rate: float | None = None
        for n in sorted(args.sizes):
            runs: dict[str, list[float]] = {"ours": [], "floor": [], "orm": []}
            ours_rss: list[int] = []
            orm_note = ""
            for rep in range(args.repeat):
                methods = ["ours", "floor", "orm"]
                methods = methods[rep % 3 :] + methods[: rep % 3]  # rotate the order
                for method in methods:
                    if method == "orm":
                        expected = n / orm_rate if orm_rate else 0.0
                        too_big = (args.orm_max is not None and n > args.orm_max) or (
                            args.orm_max is None and expected > args.orm_budget
                        )
                        if too_big:
                            orm_note = (
                                f"skipped: expected ~{expected:.0f} s from the rate at a smaller N "
                                f"(budget {args.orm_budget:g} s; --orm-max to force)"
                                if args.orm_max is None
                                else f"skipped: N > --orm-max {args.orm_max}"
                            )
                            continue
                    result = run_child(url, method, n, batch_size=args.batch_size)
                    runs[method].append(n / result["seconds"])
                    if method == "ours":
                        ours_rss.append(result["rss_growth_kib"])
                    if method == "orm":
                        orm_rate = n / result["seconds"]
            traced = run_child(url, "ours", n, trace=True, batch_size=args.batch_size)
            ours, floor = median(runs["ours"]), median(runs["floor"])
            print(f"N={n:,}")
            print(f"  ours  (celery_jobreaper.reap)       {ours:12,.0f} rows/s")
            print(f"  floor (one UPDATE…RETURNING+INSERT) {floor:12,.0f} rows/s")
            if runs["orm"]:
                orm = median(runs["orm"])
                print(f"  orm   (seed's per-object loop)      {orm:12,.0f} rows/s")
            else:
                orm = None
                print(f"  orm   (seed's per-object loop)      {orm_note}")
            print(f"  ours/floor = {ours / floor:.2f}  (target >= 0.8)")
            if orm is not None:
                print(f"  ours/orm   = {ours / orm:.1f}  (target >= 8)")
            print(
                f"  memory of our reap: maxrss growth {max(ours_rss) / 1024:.1f} MiB, "
                f"tracemalloc peak {traced['tracemalloc_peak'] / 2**20:.1f} MiB "
                f"(untimed run under tracemalloc)"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
