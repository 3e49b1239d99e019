"""``celery -A proj jobreaper plan | reap | status``."""

from __future__ import annotations

import json
from typing import Any

import click
from celery.bin.base import CeleryCommand, handle_preload_options
from sqlalchemy import select
from sqlalchemy.engine import Connection

from .api import reap
from .database import Database
from .errors import MissingTableError
from .report import Report
from .schema import tables
from .settings import Settings
from .sources import resolve_table
from .vocabulary import DRAINING, MANUAL, RUNNING


@click.group()
@click.pass_context
@handle_preload_options
def jobreaper(ctx: click.Context) -> None:
    """Settle jobs left running by dead workers (celery_jobreaper)."""


def _print_report(ctx: click.Context, report: Report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({**report.as_dict(), "planned": report.planned}, indent=2))
        return
    for item in report.planned:
        click.echo(
            f"would fail {item['source']} job {item['job_id']} ({item['kind']}): {item['reason']}"
        )
    verb = "would settle" if report.dry_run else "settled"
    count = report.would_settle if report.dry_run else report.settled
    click.echo(f"{verb} {count} of {report.candidates} candidate job(s) in {report.duration:.3f} s")
    for reason, n in report.left_alone.items():
        click.echo(f"left alone: {n} ({reason})")


@jobreaper.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def plan(ctx: click.Context, as_json: bool) -> None:
    """Show what a reap would settle now, and why; change nothing."""
    _print_report(ctx, reap(ctx.obj.app, dry_run=True, trigger=MANUAL), as_json)


@jobreaper.command(cls=CeleryCommand)
@click.option(
    "--max-age",
    type=float,
    default=None,
    help="Also settle ownerless jobs older than this many seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def reap_command(ctx: click.Context, max_age: float | None, as_json: bool) -> None:
    """Settle stale jobs now, from this process."""
    overrides: dict[str, Any] = {} if max_age is None else {"max_age": max_age}
    _print_report(ctx, reap(ctx.obj.app, trigger=MANUAL, **overrides), as_json)


reap_command.name = "reap"


def _missing_tables(settings: Settings, conn: Connection) -> dict[str, str]:
    """``jobreaper_sources[i].table`` -> why, for each configured table that does not exist."""
    missing: dict[str, str] = {}
    for spec in settings.sources:
        try:
            resolve_table(spec, conn)
        except MissingTableError as error:
            missing[error.key] = error.problem
    return missing


@jobreaper.command(cls=CeleryCommand)
@click.option("--limit", type=int, default=10, show_default=True, help="How many runs to show.")
@click.pass_context
def status(ctx: click.Context, limit: int) -> None:
    """Show live worker incarnations, configured tables that do not exist, and the last reap
    runs from the ledger."""
    settings = Settings.from_app(ctx.obj.app)
    db = Database.from_settings(settings)
    try:
        with db.connect() as conn:
            inc = tables.incarnations
            workers = conn.execute(
                select(inc).where(inc.c.state.in_((RUNNING, DRAINING))).order_by(inc.c.node)
            ).all()
            runs = conn.execute(
                select(tables.runs).order_by(tables.runs.c.id.desc()).limit(limit)
            ).all()
            missing = _missing_tables(settings, conn)
    finally:
        db.dispose()
    click.echo(f"database: {db.url}")
    if missing:
        click.echo(f"missing tables ({len(missing)}): their jobs are not reaped until they exist")
        for key, problem in missing.items():
            click.echo(f"  {key}: {problem}")
    elif settings.sources:
        click.echo(f"tables of jobreaper_sources: all {len(settings.sources)} present")
    click.echo(f"workers ({len(workers)}):")
    for w in workers:
        click.echo(
            f"  {w.node}  {w.state}  pid {w.pid} on {w.host}  "
            f"heartbeat {w.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC"
        )
    click.echo(f"last {len(runs)} run(s):")
    for r in runs:
        flag = " dry-run" if r.dry_run else ""
        err = f"  ERROR {r.error}" if r.error else ""
        click.echo(
            f"  #{r.id} {r.started_at:%Y-%m-%d %H:%M:%S} {r.trigger}{flag} on "
            f"{r.node or '(not a worker)'}: settled {r.settled}, left {r.left_alone}, "
            f"{(r.duration or 0):.3f} s{err}"
        )
