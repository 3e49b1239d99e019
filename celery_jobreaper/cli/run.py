"""``jobreaper plan`` (a dry run) and ``jobreaper reap`` (asks first on a terminal)."""

from __future__ import annotations

import sys
from typing import Any

import click
from celery.bin.base import CeleryCommand

from ..api import reap
from ..errors import ConfigurationError
from ..remote_client import reap_on
from ..report import Report
from ..vocabulary import MANUAL
from .group import (
    EXIT_DECLINED,
    EXIT_FAILED,
    EXIT_NO_REPORT,
    EXIT_USAGE,
    echo_json,
    fail,
    jobreaper,
)
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


_ON = click.option(
    "--on",
    "on",
    multiple=True,
    metavar="NODE",
    help="Have this worker do it (by remote control; repeat for several, 'all' for every "
    "jobreaper worker) and print its report, instead of doing it in this process.",
)
_TIMEOUT = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="With --on: seconds to wait for the workers' reports.",
)


def _remote(
    ctx: click.Context, on: tuple[str, ...], *, dry_run: bool, timeout: float
) -> dict[str, dict[str, Any]]:
    nodes = None if "all" in on else list(on)
    try:
        return reap_on(ctx.obj.app, nodes, dry_run=dry_run, timeout=timeout)
    except Exception as error:  # the broker cannot be reached: one line, not a traceback
        fail(f"could not ask the workers: {type(error).__name__}: {error}", EXIT_FAILED)


def _asked(on: tuple[str, ...], answers: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(answers) if "all" in on else sorted(set(on))


def _print_remote(asked: list[str], answers: dict[str, dict[str, Any]], *, err: bool) -> None:
    for node in asked:
        answer = answers.get(node) or {}
        body = answer.get("report")
        if body is None:
            why = answer.get("error") or (
                "accepted, but no report in time" if answer else "no answer"
            )
            click.echo(f"{node}: {why}", err=err)
            continue
        verb = "would settle" if body["dry_run"] else "settled"
        count = body["would_settle"] if body["dry_run"] else body["settled"]
        click.echo(
            f"{node}: {verb} {count} of {body['candidates']} candidate job(s) in "
            f"{body['duration']:.3f} s",
            err=err,
        )
        for p in body.get("planned", []):
            click.echo(f"  would fail {p['source']} {p['job_id']}: {p['reason']}", err=err)
        for reason, n in body["left_alone"].items():
            click.echo(f"  left alone: {n} ({reason})", err=err)
        if body.get("error"):
            click.echo(f"  the reap failed: {body['error']}", err=err)


def _show_remote(on: tuple[str, ...], answers: dict[str, dict[str, Any]], as_json: bool) -> None:
    """Each worker's report; exit 1 if one failed, 4 if one did not report (or none did)."""
    asked = _asked(on, answers)
    if as_json:
        echo_json({node: answers.get(node) for node in asked})
    else:
        _print_remote(asked, answers, err=False)
    if not asked:
        fail("no jobreaper worker answered", EXIT_NO_REPORT)
    got = [answers.get(node) or {} for node in asked]
    if any("error" in a or (a.get("report") or {}).get("error") for a in got):
        fail("a worker refused or its reap failed", EXIT_FAILED)
    if any("report" not in a for a in got):
        fail("a worker did not report in time", EXIT_NO_REPORT)


def _would_settle(answers: dict[str, dict[str, Any]]) -> int:
    return sum(int((a.get("report") or {}).get("would_settle", 0)) for a in answers.values())


def _reap_remote(
    ctx: click.Context, on: tuple[str, ...], *, timeout: float, ask: bool, as_json: bool
) -> None:
    """``reap --on``: on a terminal, a remote dry run first, and a question above 5 jobs."""
    if ask:
        plans = _remote(ctx, on, dry_run=True, timeout=timeout)
        if _would_settle(plans) > ASK_ABOVE:
            _print_remote(_asked(on, plans), plans, err=True)
            if not click.confirm(f"Settle these {_would_settle(plans)} jobs now?", err=True):
                fail("nothing changed", EXIT_DECLINED)
    _show_remote(on, _remote(ctx, on, dry_run=False, timeout=timeout), as_json)


@jobreaper.command(cls=CeleryCommand)
@_MAX_AGE
@_ON
@_TIMEOUT
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def plan(
    ctx: click.Context, max_age: float | None, on: tuple[str, ...], timeout: float, as_json: bool
) -> None:
    """Show what a reap would settle now, and why; change nothing."""
    if on:
        if max_age is not None:
            fail("--max-age applies to a reap in this process, not with --on", EXIT_USAGE)
        _show_remote(on, _remote(ctx, on, dry_run=True, timeout=timeout), as_json)
        return
    _show(_run(ctx, dry_run=True, **_overrides(max_age)), as_json)


@jobreaper.command(cls=CeleryCommand, name="reap")
@_MAX_AGE
@_ON
@_TIMEOUT
@click.option("--yes", "-y", is_flag=True, help="Do not ask, even on a terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def reap_command(
    ctx: click.Context,
    *,
    max_age: float | None,
    on: tuple[str, ...],
    timeout: float,
    yes: bool,
    as_json: bool,
) -> None:
    """Settle stale jobs now, from this process (or, with --on, on those workers).

    On a terminal, when more than 5 jobs would change, shows them (on stderr) and asks first.
    """
    if on:
        if max_age is not None:
            fail("--max-age applies to a reap in this process, not with --on", EXIT_USAGE)
        _reap_remote(ctx, on, timeout=timeout, ask=not yes and sys.stdin.isatty(), as_json=as_json)
        return
    overrides = _overrides(max_age)
    if not yes and sys.stdin.isatty():
        preview = _run(ctx, dry_run=True, **overrides)
        if preview.error is None and preview.would_settle > ASK_ABOVE:
            _show(preview, as_json=False, err=True)
            if not click.confirm(f"Settle these {preview.would_settle} jobs now?", err=True):
                fail("nothing changed", EXIT_DECLINED)
    _show(_run(ctx, dry_run=False, **overrides), as_json)
