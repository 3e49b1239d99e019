"""``jobreaper status``: workers with their heartbeat age, stale candidates, the last runs."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import click
from celery.bin.base import CeleryCommand
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from .. import lease as lease_store
from ..clock import db_utcnow
from ..errors import ConfigurationError, SchemaVersionError
from ..reaper import Reaper
from ..schema import tables
from ..vocabulary import LIVE_STATES
from .group import EXIT_FAILED, EXIT_USAGE, database, echo_json, fail, jobreaper, settings_of
from .output import age, table


@jobreaper.command(cls=CeleryCommand)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many runs to show.",
)
@click.option(
    "--recent",
    type=click.FloatRange(min=0),
    default=3600,
    show_default=True,
    help="Also show workers that stopped or died within this many seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, limit: int, recent: float, as_json: bool) -> None:
    """Show workers (live and recently ended), stale candidates per source and the last runs.

    Reads only: no table is created, no worker is pinged.
    """
    settings = dataclasses.replace(settings_of(ctx), create_tables=False)
    with database(settings) as db:
        reaper = Reaper(ctx.obj.app, settings, db, skip_missing_tables=True)
        try:
            sources = reaper.prepare()
        except SchemaVersionError as error:
            fail(str(error).removeprefix("jobreaper: "), EXIT_FAILED)
        except ConfigurationError as error:  # a source that does not fit its table
            fail(str(error), EXIT_USAGE)
        inc, runs = tables.incarnations, tables.runs
        with db.connect() as conn:
            now = db_utcnow(conn)
            ended_since = now - timedelta(seconds=recent)
            workers = conn.execute(
                select(inc)
                .where(
                    inc.c.state.in_(LIVE_STATES)
                    | (func.coalesce(inc.c.stopped_at, inc.c.heartbeat_at) >= ended_since)
                )
                .order_by(inc.c.node, inc.c.started_at)
            ).all()
            stale = [(s.name, *s.stale_summary(conn)) for s in sources]
            last = conn.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).all()
            leader = _leader(conn)
        url = db.url
    result: dict[str, Any] = {
        "database": url,
        "now": now,
        "workers": [
            {
                "node": w.node,
                "incarnation": w.id,
                "state": w.state,
                "pid": w.pid,
                "host": w.host,
                "started_at": w.started_at,
                "heartbeat_at": w.heartbeat_at,
                "heartbeat_age": (now - w.heartbeat_at).total_seconds(),
                "stopped_at": w.stopped_at,
            }
            for w in workers
        ],
        "sources": [
            {"source": name, "stale": count, "oldest_started_at": oldest}
            for name, count, oldest in stale
        ],
        "missing_tables": dict(reaper.missing_sources),
        "leader": None if leader is None else leader.as_dict(),
        "runs": [dict(r._mapping) for r in last],
    }
    if as_json:
        echo_json(result)
        return
    click.echo(f"database: {url}   (now {now:%Y-%m-%d %H:%M:%S} UTC, the database's clock)")
    click.echo(f"\nworkers ({len(workers)}; live, and ended in the last {recent:g} s):")
    table(
        ("node", "state", "pid", "host", "started", "heartbeat", "ended"),
        [
            (
                w.node,
                w.state,
                w.pid,
                w.host,
                w.started_at,
                f"{age(w.heartbeat_at, now)} ago",
                w.stopped_at,
            )
            for w in workers
        ],
    )
    if leader is None:
        click.echo("\nmaintenance leader: none yet (no worker has taken the lease)")
    else:
        click.echo(
            f"\nmaintenance leader: {leader.node} (generation {leader.generation}, "
            f"lease held {leader.age:.1f} s, "
            + (
                f"expires in {(leader.expires_at - leader.now).total_seconds():.1f} s)"
                if leader.live
                else f"expired {(leader.now - leader.expires_at).total_seconds():.1f} s ago)"
            )
        )
    click.echo("\nstale candidates (jobs in a stale status; a reap judges which are dead):")
    table(
        ("source", "jobs", "oldest start", "age"),
        [(name, count, oldest, age(oldest, now)) for name, count, oldest in stale],
    )
    missing = reaper.missing_sources
    if missing:
        click.echo(f"\nmissing tables ({len(missing)}): their jobs are not reaped until they exist")
        for key, why in missing.items():
            click.echo(f"  {key}: {why}")
    click.echo(f"\nlast {len(last)} run(s):")
    table(
        ("run", "started", "trigger", "node", "settled", "left", "seconds", "error"),
        [
            (
                r.id,
                r.started_at,
                r.trigger + (" (dry)" if r.dry_run else ""),
                r.node or "(not a worker)",
                r.settled,
                r.left_alone,
                f"{r.duration or 0:.3f}",
                r.error,
            )
            for r in last
        ],
    )


def _leader(conn: Any) -> lease_store.LeaseState | None:
    """The maintenance lease as the database holds it (``None``: never taken, or its table is
    not there yet: tables made by an older release, ``status`` creates nothing)."""
    try:
        return lease_store.read(conn, tables)  # read last: a failure ends nothing else
    except DBAPIError:
        return None
