"""``jobreaper plan`` (a dry run) and ``jobreaper reap`` (asks first on a terminal)."""

from __future__ import annotations

import sys
from typing import Any

import click
from celery.bin.base import CeleryCommand

from ..api import reap
from ..errors import ConfigurationError
from ..report import Report
from ..vocabulary import MANUAL
from .group import EXIT_DECLINED, EXIT_FAILED, EXIT_USAGE, echo_json, fail, jobreaper
from .output import table

#: ``reap`` on a terminal asks before changing more jobs than this (``--yes`` skips the question)
ASK_ABOVE = 5


def _run(ctx: click.Context, *, dry_run: bool, **overrides: Any) -> Report:
    try:
        return reap(ctx.obj.app, dry_run=dry_run, trigger=MANUAL, **overrides)
    except ConfigurationError as error:
        fail(str(error), EXIT_USAGE)
    except Exception as error:  # logged with its traceback by the reaper; one line here
        first = str(error).splitlines()[0] if str(error) else ""
        fail(f"the reap failed: {type(error).__name__}: {first}", EXIT_FAILED)


def _show(report: Report, as_json: bool, *, err: bool = False) -> None:
    if as_json:
        echo_json({**report.as_dict(), "planned": report.planned})
    else:
        if report.planned:
            click.echo("would fail:", err=err)
            table(
                ("source", "job", "kind", "reason"),
                [(p["source"], p["job_id"], p["kind"], p["reason"]) for p in report.planned],
                width=70,
                err=err,
            )
        verb = "would settle" if report.dry_run else "settled"
        count = report.would_settle if report.dry_run else report.settled
        click.echo(
            f"{verb} {count} of {report.candidates} candidate job(s) in {report.duration:.3f} s",
            err=err,
        )
        for reason, n in report.left_alone.items():
            click.echo(f"left alone: {n} ({reason})", err=err)
        if report.broker:
            counts = ", ".join(f"{k} {v}" for k, v in report.broker.items())
            click.echo(f"broker: {counts}", err=err)
    if report.error is not None:
        fail(f"the reap failed: {report.error}", EXIT_FAILED)


def _overrides(max_age: float | None) -> dict[str, Any]:
    return {} if max_age is None else {"max_age": max_age}


_MAX_AGE = click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Also settle ownerless jobs older than this many seconds.",
)


@jobreaper.command(cls=CeleryCommand)
@_MAX_AGE
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def plan(ctx: click.Context, max_age: float | None, as_json: bool) -> None:
    """Show what a reap would settle now, and why; change nothing."""
    _show(_run(ctx, dry_run=True, **_overrides(max_age)), as_json)


@jobreaper.command(cls=CeleryCommand, name="reap")
@_MAX_AGE
@click.option("--yes", "-y", is_flag=True, help="Do not ask, even on a terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def reap_command(ctx: click.Context, max_age: float | None, yes: bool, as_json: bool) -> None:
    """Settle stale jobs now, from this process.

    On a terminal, when more than 5 jobs would change, shows them (on stderr) and asks first.
    """
    overrides = _overrides(max_age)
    if not yes and sys.stdin.isatty():
        preview = _run(ctx, dry_run=True, **overrides)
        if preview.error is None and preview.would_settle > ASK_ABOVE:
            _show(preview, as_json=False, err=True)
            if not click.confirm(f"Settle these {preview.would_settle} jobs now?", err=True):
                fail("nothing changed", EXIT_DECLINED)
    _show(_run(ctx, dry_run=False, **overrides), as_json)
