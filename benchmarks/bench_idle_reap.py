"""Cost of the late-write check (DESIGN §2.4) in an idle periodic reap with a user table.

A fresh PostgreSQL database holds the seed-shaped ``system_jobs`` table with only finished
jobs and a ledger of old settlements (outside ``jobreaper_late_write_window``), the shape of a
cluster that has run for a while. One process reaps again and again (trigger ``periodic``,
nothing stale), alternating a reaper with the check (default window, 3 h) and one without
(``jobreaper_late_write_window = 0``). Printed: the median duration of a reap (seconds) and
the statements it sends, for both, and the difference.

    python benchmarks/bench_idle_reap.py              # 200 reaps of each, 100k old events
    python benchmarks/bench_idle_reap.py 50 10000     # quick
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from _common import median, throwaway_database
from celery import Celery
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, create_engine, event, text

from celery_jobreaper.database import Database
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.settings import Settings
from celery_jobreaper.vocabulary import PERIODIC

SOURCE = {
    "table": "system_jobs",
    "id": "job_id",
    "status": "status",
    "kind": "job_type",
    "started_at": "started_at",
    "completed_at": "completed_at",
    "error": "error",
}


def prepare(url: str, rows: int) -> None:
    engine = create_engine(url)
    jobs = Table(
        "system_jobs",
        MetaData(),
        Column("job_id", String(64), primary_key=True),
        Column("job_type", String(64)),
        Column("status", String(16), nullable=False),
        Column("started_at", DateTime),
        Column("completed_at", DateTime),
        Column("error", Text),
    )
    jobs.create(engine)
    create_all(engine)
    old = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=2)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO system_jobs (job_id, job_type, status, started_at, completed_at) "
                "SELECT 'j' || g, 'scan', 'failed', :old, :old FROM generate_series(1, :n) g"
            ),
            {"old": old, "n": rows},
        )
        conn.execute(
            text(
                f"INSERT INTO {tables.events.name} (at, source, job_id, action, new_status, "
                "previous_status, reason) SELECT :old, 'system_jobs', 'j' || g, 'settled', "
                "'failed', 'running', 'old' FROM generate_series(1, :n) g"
            ),
            {"old": old, "n": rows},
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()


def reaper(url: str, window: float) -> Reaper:
    app = Celery("bench", set_as_current=False)
    app.conf.update(
        jobreaper_database_url=url,
        jobreaper_sources=[SOURCE],
        jobreaper_late_write_window=window,
    )
    settings = Settings.from_app(app)
    return Reaper(app, settings, Database.from_settings(settings), ping=lambda *a, **k: set())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reaps", type=int, nargs="?", default=200)
    parser.add_argument("rows", type=int, nargs="?", default=100_000)
    args = parser.parse_args()
    with throwaway_database() as url:
        prepare(url, args.rows)
        variants = {"with check": reaper(url, 10800.0), "without": reaper(url, 0.0)}
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        statements: dict[str, list[int]] = {name: [] for name in variants}
        for r in variants.values():  # warm-up: tables checked, sources resolved
            r.run(PERIODIC)
        for _ in range(args.reaps):
            for name, r in variants.items():
                sent = [0]

                def count(*_: Any, sent: list[int] = sent) -> None:
                    sent[0] += 1

                event.listen(r.db.engine, "before_cursor_execute", count)
                began = time.perf_counter()
                r.run(PERIODIC)
                seconds[name].append(time.perf_counter() - began)
                event.remove(r.db.engine, "before_cursor_execute", count)
                statements[name].append(sent[0])
        for r in variants.values():
            r.db.dispose()
    print(f"idle periodic reap, PostgreSQL, {args.rows} old settlements, {args.reaps} reaps each")
    for name in variants:
        print(
            f"  {name:<11} median {median(seconds[name]) * 1000:7.3f} ms, "
            f"{median([float(s) for s in statements[name]]):.0f} statements"
        )
    extra = median(seconds["with check"]) - median(seconds["without"])
    print(f"  the check adds {extra * 1000:.3f} ms (median difference)")


if __name__ == "__main__":
    main()
