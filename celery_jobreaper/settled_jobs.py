"""The jobs a batch settled, recorded by the run: counted in its tally, logged one by one and
sent with :data:`~celery_jobreaper.signals.jobs_settled`; in a dry run, the jobs it would
settle, counted, logged and planned (the report's plan, capped at
:data:`MAX_PLANNED_IN_REPORT`)."""

from __future__ import annotations

import logging
from typing import Any

from . import signals
from .planner import Decision
from .settled import Tally
from .sources import JobSource
from .textsafe import safe

#: The run's job lines keep the logger they have always had (the reaper's).
logger = logging.getLogger("celery_jobreaper.reaper")

MAX_PLANNED_IN_REPORT = 1000


def read_one_by_one(sender: Any) -> bool:
    """Whether someone reads settled jobs one by one (their log lines, a signal receiver)."""
    return logger.isEnabledFor(logging.INFO) or signals.jobs_settled.has_listeners(sender)


def record_settled(sender: Any, source: JobSource, done: list[Decision], tally: Tally) -> None:
    """A committed batch's settled jobs: counted, logged, and signalled by *sender*."""
    tally.settled += len(done)
    tally.per_source[source.name] += len(done)
    for d in done:
        tally.settled_by[(source.name, d.candidate.kind or "", d.cause)] += 1
        logger.info(
            "jobreaper: Clearing job: %s (%s) from %s: %s",
            safe(d.candidate.job_id),
            safe(d.candidate.kind),
            safe(source.name),
            safe(d.reason),
        )
        if d.candidate.task_id:
            tally.task_ids.add(d.candidate.task_id)
    if done:
        signals.jobs_settled.send(sender=sender, decisions=done, source=source.name)


def count_settled(source: JobSource, cause: str, settled: int, tally: Tally) -> None:
    """A committed batch's settled jobs, counted but not read (no one reads them one by one)."""
    tally.settled += settled
    tally.per_source[source.name] += settled
    tally.settled_by[(source.name, "", cause)] += settled


def record_would_settle(fails: list[Decision], tally: Tally) -> None:
    """In a dry run, a batch's jobs to fail: counted, logged and planned."""
    tally.would_settle += len(fails)
    for d in fails:
        logger.info(
            "jobreaper: [dry run] would clear job: %s (%s): %s",
            safe(d.candidate.job_id),
            safe(d.candidate.kind),
            safe(d.reason),
        )
        if len(tally.planned) < MAX_PLANNED_IN_REPORT:
            tally.planned.append(_planned(d))
        if d.candidate.task_id:
            tally.task_ids.add(d.candidate.task_id)


def _planned(d: Decision) -> dict[str, Any]:
    c = d.candidate
    return {
        "source": c.source,
        "job_id": str(c.job_id),
        "kind": c.kind,
        "status": c.status,
        "owner": c.owner,
        "task_id": c.task_id,
        "reason": d.reason,
        "error": d.error,
    }
