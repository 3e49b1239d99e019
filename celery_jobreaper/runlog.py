"""A run's row in ``jobreaper_runs`` (opened, then closed with its figures) and its log lines."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import insert, update
from sqlalchemy.engine import Connection

from .database import Database
from .report import Report
from .schema import JobReaperTables
from .settled import Tally
from .textsafe import safe
from .vocabulary import PERIODIC

logger = logging.getLogger(__name__)


def open_run(
    conn: Connection, tbls: JobReaperTables, tally: Tally, incarnation_id: str | None
) -> int | None:
    """Insert the run's row (in the caller's transaction); its id."""
    key = conn.execute(
        insert(tbls.runs).values(
            node=tally.node,
            incarnation_id=incarnation_id,
            trigger=tally.trigger,
            dry_run=tally.dry_run,
            started_at=tally.started_at,
        )
    ).inserted_primary_key
    return None if key is None else int(key[0])


def worth_a_row(report: Report) -> bool:
    """Whether a run without a runs row yet did (or failed at) anything worth one."""
    acted = any(n for key, n in report.broker.items() if key != "scanned")
    return report.error is not None or acted or bool(report.settled or report.would_settle)


def record_run(
    db: Database, tbls: JobReaperTables, report: Report, incarnation_id: str | None
) -> int | None:
    """Insert the row of a run that had none (a periodic reap that found no stale job, whose
    sweep acted or that failed), closed by :func:`close_run`; a failure is logged."""
    tally = Tally(
        trigger=report.trigger,
        dry_run=report.dry_run,
        started_at=report.started_at,
        node=report.node,
    )
    try:
        with db.connect() as conn, conn.begin():
            return open_run(conn, tbls, tally, incarnation_id)
    except Exception:
        logger.exception("jobreaper: could not record a %s run", report.trigger)
        return None


def close_run(db: Database, tbls: JobReaperTables, report: Report) -> None:
    """Record the run's end and figures; a failure is logged, never raised."""
    if report.run_id is None:
        return
    try:
        with db.connect() as conn, conn.begin():
            conn.execute(
                update(tbls.runs)
                .where(tbls.runs.c.id == report.run_id)
                .values(
                    finished_at=report.started_at + timedelta(seconds=report.duration or 0.0),
                    duration=report.duration,
                    candidates=report.candidates,
                    settled=report.settled or report.would_settle,
                    left_alone=sum(report.left_alone.values()),
                    error=report.error,
                )
            )
    except Exception:
        logger.exception("jobreaper: could not record the end of run %s", report.run_id)


def log_run(report: Report) -> None:
    """The run's summary lines (a periodic run that found nothing logs at DEBUG)."""
    left = sum(report.left_alone.values())
    if report.error is not None:
        logger.error(
            "jobreaper: %s reap failed after %.3f s: %s (settled %d before that)",
            report.trigger,
            report.duration,
            safe(report.error),
            report.settled,
        )
    elif report.settled or report.would_settle:
        logger.info(
            "jobreaper: %s %d stale jobs to failed (%s) in %.3f s; left %d alone",
            "[dry run] would reset" if report.dry_run else "Reset",
            report.would_settle if report.dry_run else report.settled,
            ", ".join(f"{k}: {v}" for k, v in report.per_source.items()) or "dry run",
            report.duration,
            left,
        )
    else:
        # A periodic no-op is routine: keep it out of INFO.
        level = logging.DEBUG if report.trigger == PERIODIC else logging.INFO
        logger.log(
            level,
            "jobreaper: No stale jobs found (%s, %.3f s)%s",
            report.trigger,
            report.duration,
            f"; left {left} alone" if left else "",
        )
    for reason, count in report.left_alone.items():
        level = logging.DEBUG if report.trigger == PERIODIC else logging.INFO
        logger.log(level, "jobreaper: left %d job(s) alone: %s", count, safe(reason))
