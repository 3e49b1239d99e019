"""What the tracker's vouch costs: start-only flushes with and without it, side by side.

A flush that writes a still-running tracked job first heartbeats the worker's incarnation
(``Statements.vouch``, committed on its own; see ``Tracker._apply``). Here N threads stand for
N pool processes of one worker, each with its own ``Tracker`` and connection, each writing
starts one flush at a time (the worst case: a start that waits for no finish, every flush
vouching, all on the one incarnation row). Rounds alternate vouch on / off (off: as before
the vouch, a lone start is one autocommitted upsert); printed: median starts/s of each and
the ratio on/off, per N.

    python benchmarks/bench_vouch.py               # N = 1 and 8, 300 starts each, 3 rounds
    python benchmarks/bench_vouch.py 100 2         # quick
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from typing import Any

from _common import median, throwaway_database
from celery import Celery
from sqlalchemy import create_engine

from celery_jobreaper import Settings
from celery_jobreaper.database import Database
from celery_jobreaper.incarnation import Incarnation
from celery_jobreaper.liveness import Liveness
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.tracking import Tracker
from celery_jobreaper.tracking import tracker as tracker_module
from celery_jobreaper.vocabulary import RUNNING


def one_round(url: str, writers: int, per: int, vouch: bool) -> float:
    """Starts per second written by *writers* trackers of one incarnation, *per* each."""
    app = Celery("bench", set_as_current=False)
    app.conf.jobreaper_database_url = url
    app.conf.jobreaper_track_tasks = True
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    me = Incarnation.new(f"w{uuid.uuid4().hex[:6]}@h")
    with db.engine.begin() as conn:
        Liveness(tables, heartbeat_timeout=30).register(conn, me)
    if not vouch:  # as before the vouch: a lone start is one autocommitted upsert
        tracker_module.RUNNING = "(no flush vouches)"  # type: ignore[misc]
    trackers = [Tracker(db, tables, settings, me) for _ in range(writers)]

    def work(tracker: Any, k: int) -> None:
        for i in range(per):
            tracker.started(f"{k}-{i}-{uuid.uuid4().hex[:8]}", "bench.long", me.node)
            tracker.flush(timeout=30)

    threads = [threading.Thread(target=work, args=(t, k)) for k, t in enumerate(trackers)]
    try:
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.perf_counter() - began
    finally:
        tracker_module.RUNNING = RUNNING  # type: ignore[misc]
        for tracker in trackers:
            tracker.close()
        db.dispose()
    return writers * per / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("per", nargs="?", type=int, default=300, help="starts per writer")
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    args = parser.parse_args()
    with throwaway_database("jrvouch") as url:
        engine = create_engine(url)
        create_all(engine)
        engine.dispose()
        print(
            f"bench_vouch: start-only flushes, {args.per} per writer, {args.rounds} rounds,"
            " PostgreSQL"
        )
        for writers in (1, 8):
            on: list[float] = []
            off: list[float] = []
            for r in range(args.rounds):
                order = (True, False) if r % 2 == 0 else (False, True)
                for vouch in order:
                    (on if vouch else off).append(one_round(url, writers, args.per, vouch))
            ratio = median(on) / median(off)
            print(
                f"  writers={writers}: vouch on {median(on):.0f} starts/s, off {median(off):.0f}"
                f" starts/s, ratio on/off = {ratio:.2f}"
            )


if __name__ == "__main__":
    main()
