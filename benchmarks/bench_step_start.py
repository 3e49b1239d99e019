"""The step's own start work, without a worker around it: register + the startup reap.

``bench_startup.py`` times a whole ``celery worker`` from spawn to ``ready.``; on a busy
machine its spread (hundreds of ms) hides differences of a few ms. This one times only what
the step does at start (``ReaperService.startup()``: create/check the tables, register the
incarnation, the startup reap) in a fresh Python process each time (a worker's first
statements are compiled then), on a fresh PostgreSQL database where nothing is stale, with
default settings and with the seed-shaped ``system_jobs`` table (1000 finished jobs) as a
source. It also counts what reaches the database (statements, plus BEGIN/COMMIT/ROLLBACK).

    python benchmarks/bench_step_start.py 21
    python benchmarks/bench_step_start.py 21 --baseline /tmp/base   # before/after, interleaved
                                                                    # (order alternating)

``--baseline DIR`` is a source tree of another version (``git archive <commit> | tar -x -C
DIR``), imported first on ``PYTHONPATH`` for the ``base`` rows.

Each row also gives the child's CPU time over the same span (its Python work: statement
compilation, reflection, the driver; not the database's), steadier than wall time on a shared
machine. The import of ``celery_jobreaper.step`` (what the app module's ``install`` loads, on
top of celery, kombu and SQLAlchemy) is timed apart: it is not in the step's start figures.
Children write and read ``.pyc`` files even where ``PYTHONDONTWRITEBYTECODE`` is set, as a
deployed worker does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import median, throwaway_database
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import celery, celery.worker, kombu, sqlalchemy, sqlalchemy.engine  # a worker has these anyway
imported = time.perf_counter()
import celery_jobreaper.step  # what loading the step adds (the app module installs it)
imported = time.perf_counter() - imported
from celery import Celery
from sqlalchemy import event
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.service import ReaperService
from celery_jobreaper.settings import Settings

url, with_table = sys.argv[1], sys.argv[2] == "1"
app = Celery("bench", set_as_current=False)
app.conf.jobreaper_database_url = url
if with_table:
    app.conf.jobreaper_sources = [{
        "table": "system_jobs", "id": "job_id", "status": "status", "kind": "job_type",
        "started_at": "started_at", "completed_at": "completed_at", "error": "error",
    }]
settings = Settings.from_app(app)
db = Database.from_settings(settings)
me = Incarnation.new("bench-step@h")
sent = [0]
def count(*_):
    sent[0] += 1
for name in ("before_cursor_execute", "begin", "commit", "rollback"):
    event.listen(db.engine, name, count)
reaper = Reaper(app, settings, db, me=me, ping=lambda nodes, timeout: set(), held=set)
service = ReaperService(reaper, me)
began, cpu = time.perf_counter(), time.process_time()
service.startup()
took, cpu = time.perf_counter() - began, time.process_time() - cpu
print(json.dumps({"seconds": took, "cpu": cpu, "sent": sent[0], "import": imported}))
service.stop()
"""


def setup(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE system_jobs (job_id varchar(64) PRIMARY KEY, job_type varchar(64), "
                "status varchar(16) NOT NULL, started_at timestamp, completed_at timestamp, "
                "error text)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO system_jobs SELECT 'job_' || i, 'library_scan', 'completed', "
                "now() - interval '1 hour', now(), NULL FROM generate_series(1, 1000) AS i"
            )
        )
    engine.dispose()


def start(url: str, tree: Path, with_table: bool, cwd: str) -> tuple[float, float, int, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTHONWARNINGS", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a worker's imports read .pyc files, not sources
    out = subprocess.run(
        [sys.executable, "-c", CHILD, url, "1" if with_table else "0"],
        env=env,
        cwd=cwd,  # not a source tree: only PYTHONPATH decides which package is imported
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return (
        float(result["seconds"]),
        float(result["cpu"]),
        int(result["sent"]),
        float(result["import"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", type=int, default=15)
    parser.add_argument("--baseline", type=Path, default=None)
    args = parser.parse_args()
    trees = {"this": ROOT, **({"base": args.baseline} if args.baseline else {})}
    seconds: dict[tuple[str, bool], list[float]] = {}
    sent: dict[tuple[str, bool], int] = {}
    imports: dict[str, list[float]] = {}
    cpu: dict[tuple[str, bool], list[float]] = {}  # the child's: steadier on a busy machine
    with throwaway_database() as url, tempfile.TemporaryDirectory() as cwd:
        setup(url)
        start(url, ROOT, True, cwd)  # warm-up: tables created, .pyc files written
        for tree in trees.values():
            start(url, tree, True, cwd)
        for run in range(args.runs):
            order = list(trees.items())
            for name, tree in order if run % 2 == 0 else order[::-1]:  # neither always first
                for with_table in (False, True):
                    took, used, n, imported = start(url, tree, with_table, cwd)
                    seconds.setdefault((name, with_table), []).append(took)
                    cpu.setdefault((name, with_table), []).append(used)
                    sent[(name, with_table)] = n
                    imports.setdefault(name, []).append(imported)
    print(
        f"bench_step_start: register + startup reap in a fresh process (PostgreSQL, nothing "
        f"stale), median of {args.runs} interleaved runs"
    )
    for (name, with_table), values in seconds.items():
        label = "user table" if with_table else "defaults"
        print(
            f"  {name:<5} {label:<10} {median(values) * 1000:7.1f} ms "
            f"(CPU {median(cpu[(name, with_table)]) * 1000:5.1f} ms)   "
            f"{sent[(name, with_table)]} statements + BEGIN/COMMIT/ROLLBACK"
        )
    for name in trees:
        extra = median(seconds[(name, True)]) - median(seconds[(name, False)])
        print(f"  {name}: a user table adds {extra * 1000:+.1f} ms")
    for name in trees:
        print(
            f"  {name}: import celery_jobreaper.step (celery, kombu, sqlalchemy loaded) "
            f"{median(imports[name]) * 1000:.1f} ms"
        )
    if args.baseline:
        for with_table in (False, True):
            label = "user table" if with_table else "defaults"
            diff = median(seconds[("this", with_table)]) - median(seconds[("base", with_table)])
            used = median(cpu[("this", with_table)]) - median(cpu[("base", with_table)])
            print(f"  {label}: this - base = {diff * 1000:+.1f} ms (CPU {used * 1000:+.1f} ms)")
        diff = median(imports["this"]) - median(imports["base"])
        print(f"  import: this - base = {diff * 1000:+.1f} ms")


if __name__ == "__main__":
    main()
