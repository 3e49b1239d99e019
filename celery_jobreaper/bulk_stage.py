"""A source settled by the set-based path, batch by batch: one statement per batch decides
and settles (:mod:`.bulk`), the run's rechecks hold or roll the batch back, and the rows whose
start is unknown are noted as seen (:mod:`.sightings`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import bulk
from .liveness import newcomers
from .livenessview import LivenessView
from .recheck import WORKER_APPEARED, log_newcomers
from .rules import NO_LIVE_WORKER_LEFT
from .schema import JobReaperTables
from .settled import Tally
from .settled_jobs import count_settled, read_one_by_one, record_settled
from .sightings import Sightings
from .sources import JobSource
from .sources.base import any_stale

#: The run's log lines keep the logger they have always had (the reaper's).
logger = logging.getLogger("celery_jobreaper.reaper")


def reap_in_bulk(
    conn: Any,
    source: JobSource,
    settler: bulk.BulkSettler,
    tally: Tally,
    view: LivenessView,
    *,
    tables: JobReaperTables,
    sightings: Sightings,
    held: Callable[[], set[str]],
    fence: Callable[[Any], object],
    sender: Any,
) -> bool:
    """Settle *source* with one statement per batch (SQL decides; see :mod:`.bulk`), counted
    in *tally*; ``False`` (nothing done): it has rows whose start is unknown, for the Python
    path. *held*: the tasks this worker holds (none in a process that is not a worker);
    *fence*: called first in each write transaction (it raises unless the run may write);
    *sender*: of the signals sent."""
    after: Any = None
    while True:
        # Settled jobs come back one by one only if someone reads them (log, signal).
        detail = read_one_by_one(sender)
        with conn.begin() as tx:
            fence(conn)
            if after is None and not any_stale(conn, source):
                # Nothing in a stale status: the batch statement (large: compiling it
                # costs a worker start several ms) is not even built.
                return True
            if after is None and bulk.any_start_unknown(conn, settler):
                return False
            # Rows whose start is unknown fail only once this reaper has seen them long
            # enough (see sightings.py); those left alone come back, to be noted.
            seen_before = (
                settler.rule.seen_before(sightings.first_seen(source.name), tally.started_at)
                if settler.none_live
                else []
            )
            got = settler.batch(conn, after, detail=detail, seen_before=seen_before)
            sightings.note(source.name, got.unseen, tally.started_at)
            if settler.where == NO_LIVE_WORKER_LEFT and got.settled and held():
                tx.rollback()  # this worker took a task meanwhile: the rule no longer holds
                logger.info(
                    "jobreaper: this worker took a task during the reap; jobs without "
                    "owner are judged again next time"
                )
                return True
            # Rows locked and changed, not committed: did a worker register (or come
            # back) since liveness was judged? Then "no live worker" no longer holds.
            came = (
                newcomers(conn, tables, view)
                if settler.where == NO_LIVE_WORKER_LEFT and got.settled
                else []
            )
            if came:
                tx.rollback()
                log_newcomers(came)
                tally.candidates += got.seen
                tally.left_alone.update(got.left_alone)
                tally.left_alone[WORKER_APPEARED] += got.settled
                return True
        # counted only once the batch is committed
        tally.candidates += got.seen
        tally.left_alone.update(got.left_alone)
        if got.rows:
            record_settled(sender, source, settler.decisions(got.rows), tally)
        elif got.settled:
            count_settled(source, settler.cause, got.settled, tally)
        if not got.more:
            return True
        after = got.last
