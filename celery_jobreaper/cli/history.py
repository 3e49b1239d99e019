"""``jobreaper history``: what was settled or moved, when, by which run, and why."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta
from typing import Any

import click
from celery.bin.base import CeleryCommand
from sqlalchemy import select

from ..clock import as_naive_utc, db_utcnow
from ..schema import tables
from .group import database, echo_json, jobreaper, settings_of
from .output import table

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class When(click.ParamType):  # type: ignore[type-arg]
    """A time: ISO 8601 (naive means UTC) or an age like ``90s``, ``15m``, ``2h``, ``3d``."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """A naive UTC datetime, or a timedelta meaning that long before now."""
        if isinstance(value, (datetime, timedelta)):
            return value
        text = str(value).strip()
        relative = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
        if relative:
            return timedelta(seconds=float(relative[1]) * _UNITS[relative[2]])
        try:
            return as_naive_utc(datetime.fromisoformat(text))
        except ValueError:
            self.fail(f"{text!r} is neither an ISO 8601 time nor an age like 2h", param, ctx)


def _at(value: datetime | timedelta | None, now: datetime) -> datetime | None:
    return now - value if isinstance(value, timedelta) else value


@jobreaper.command(cls=CeleryCommand)
@click.option("--job", "job_id", help="Only events of this job id.")
@click.option("--task", "task_id", help="Only events of this task id.")
@click.option("--source", help="Only events of this source (table name, or jobreaper_jobs).")
@click.option("--action", help="Only this action (settled, late_result, removed, restored, …).")
@click.option("--run", "run_id", type=int, help="Only events of this run.")
@click.option("--since", type=When(), help="From this time (ISO 8601 UTC) or age (e.g. 2h).")
@click.option("--until", type=When(), help="Up to this time (ISO 8601 UTC) or age (e.g. 30m).")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="At most this many, newest first.",
)
@click.option("--runs", "show_runs", is_flag=True, help="List runs instead of events.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (reasons in full).")
@click.pass_context
def history(ctx: click.Context, /, **options: Any) -> None:
    """Ledger events (or runs), newest first: why did job X fail at 03:12?"""
    since, until, limit = options["since"], options["until"], options["limit"]
    run_id, show_runs, as_json = options["run_id"], options["show_runs"], options["as_json"]
    settings = dataclasses.replace(settings_of(ctx), create_tables=False)
    ev, runs = tables.events, tables.runs
    with database(settings) as db, db.connect() as conn:
        now = db_utcnow(conn)
        start, end = _at(since, now), _at(until, now)
        if show_runs:
            query = select(runs).order_by(runs.c.id.desc()).limit(limit)
            if start is not None:
                query = query.where(runs.c.started_at >= start)
            if end is not None:
                query = query.where(runs.c.started_at <= end)
            if run_id is not None:
                query = query.where(runs.c.id == run_id)
        else:
            query = (
                select(ev, runs.c.trigger, runs.c.node.label("run_node"))
                .select_from(ev.outerjoin(runs, runs.c.id == ev.c.run_id))
                .order_by(ev.c.id.desc())
                .limit(limit)
            )
            for column, wanted in (
                (ev.c.job_id, options["job_id"]),
                (ev.c.task_id, options["task_id"]),
                (ev.c.source, options["source"]),
                (ev.c.action, options["action"]),
                (ev.c.run_id, run_id),
            ):
                if wanted is not None:
                    query = query.where(column == wanted)
            if start is not None:
                query = query.where(ev.c.at >= start)
            if end is not None:
                query = query.where(ev.c.at <= end)
        rows = [dict(r._mapping) for r in conn.execute(query)]
    if as_json:
        echo_json(rows)
        return
    if show_runs:
        table(
            ("run", "started", "trigger", "node", "candidates", "settled", "left", "error"),
            [
                (
                    r["id"],
                    r["started_at"],
                    r["trigger"] + (" (dry)" if r["dry_run"] else ""),
                    r["node"] or "(not a worker)",
                    r["candidates"],
                    r["settled"],
                    r["left_alone"],
                    r["error"],
                )
                for r in rows
            ],
        )
        return
    table(
        ("at (UTC)", "run", "source", "job", "task", "action", "status", "owner", "reason"),
        [
            (
                r["at"],
                r["run_id"],
                r["source"],
                r["job_id"],
                r["task_id"],
                r["action"],
                f"{r['previous_status'] or '-'} -> {r['new_status'] or '-'}",
                r["owner"],
                r["reason"],
            )
            for r in rows
        ],
        width=90,
    )
