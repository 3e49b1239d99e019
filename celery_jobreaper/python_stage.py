"""A source settled by the Python path, batch by batch: its rows read, the jobs whose start is
unknown noted as seen (:mod:`.sightings`), each row decided with the batch's task facts
(:mod:`.batchplan`), then, with the rows locked, checked again (:mod:`.recheck`) and settled
(:mod:`.apply`), or in a dry run planned."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from .apply import settle_batch
from .batchplan import Once, decide
from .clock import as_naive_utc
from .database import Database
from .livenessview import LivenessView
from .peers import TaskAsker
from .recheck import (
    appeared_since,
    owners_back,
    owners_still_silent,
    still_alone,
    took_task_since,
)
from .schema import JobReaperTables
from .settings import Settings
from .settled import Tally
from .settled_jobs import record_settled, record_would_settle
from .sightings import Sightings
from .sources import JobSource
from .sources.base import Candidate


def reap_in_python(
    conn: Any,
    source: JobSource,
    view: LivenessView,
    tally: Tally,
    *,
    queued: Once,
    settings: Settings,
    db: Database,
    tables: JobReaperTables,
    sightings: Sightings,
    held: Callable[[], set[str]],
    ask: TaskAsker,
    fence: Callable[[Any], object],
    sender: Any,
) -> None:
    """Settle *source* batch by batch, counted in *tally*. *queued*: the task ids waiting in
    the queues (read once per run, if asked); *held*: the tasks this worker holds (none in a
    process that is not a worker); *fence*: called first in each write transaction (it raises
    unless the run may write);
    *sender*: of the signals sent."""
    after: Any = None
    while True:
        with conn.begin():
            batch = source.batch(conn, after, settings.batch_size)
        if not batch:
            return
        after = batch[-1].job_id
        tally.candidates += len(batch)
        # Task facts are read after the rows: a task that wrote its row before the read
        # is held now, or has finished (and written its end; the update then misses).
        seen = sightings.note(
            source.name,
            [c.job_id for c in batch if _start_unknown(c, view.now, settings.heartbeat_interval)],
            view.now,
        )
        decisions = decide(
            batch,
            view,
            settings,
            held_here=frozenset(held()),
            queued=queued,
            ask=ask,
            first_seen=seen,
        )
        fails = [d for d in decisions if d.verdict == "fail"]
        for d in decisions:
            if d.verdict == "leave":
                tally.left_alone[d.reason] += 1
        if tally.dry_run:
            record_would_settle(fails, tally)
        elif fails:
            with conn.begin() as tx:
                fence(conn)
                fails = still_alone(conn, tables, view, fails, tally)
                fails = owners_still_silent(conn, tables, view, fails, tally)
                done = settle_batch(
                    conn,
                    db,
                    tables,
                    source.target,
                    fails,
                    now=tally.started_at,
                    run_id=tally.run_id,
                    revoked_expires=settings.revoked_expires,
                )
                if (
                    took_task_since(held(), fails)
                    or appeared_since(conn, tables, view, done)
                    or owners_back(conn, tables, view, done)
                ):
                    tx.rollback()
                    done = []
            record_settled(sender, source, done, tally)
        if len(batch) < settings.batch_size:
            return


def _start_unknown(c: Candidate, now: datetime, slack: float) -> bool:
    """A job aged by when this reaper first saw it: one without owner whose start is unknown;
    one whose ``owner`` column names its node with a start unknown or later than *now* by more
    than *slack* seconds (a writer clock ahead: see ``planner._may_have_woken``)."""
    if c.incarnation_id is not None:
        return False
    if c.owner is None:
        return c.started_at is None
    return c.started_at is None or as_naive_utc(c.started_at) > now + timedelta(seconds=slack)
