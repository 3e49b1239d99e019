"""``jobreaper prune``: delete finished rows older than their retention (``--dry-run`` counts)."""

from __future__ import annotations

import click
from celery.bin.base import CeleryCommand
from sqlalchemy import exc

from ..api import prune
from ..errors import ConfigurationError, MissingTableError
from .group import EXIT_FAILED, EXIT_USAGE, echo_json, fail, jobreaper
from .output import table


@jobreaper.command(cls=CeleryCommand, name="prune")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to keep jobreaper's own finished rows (default: jobreaper_retention).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_context
def prune_command(
    ctx: click.Context, dry_run: bool, older_than: float | None, as_json: bool
) -> None:
    """Delete finished tracked jobs, runs and events past their retention, and the finished
    rows of user tables that opted in (prune_after), in short batches."""
    try:
        result = prune(ctx.obj.app, dry_run=dry_run, older_than=older_than)
    except ConfigurationError as error:
        fail(str(error), EXIT_USAGE)
    except (exc.SQLAlchemyError, MissingTableError) as error:
        first = str(error).splitlines()[0] if str(error) else ""
        fail(f"the prune failed: {type(error).__name__}: {first}", EXIT_FAILED)
    if as_json:
        echo_json(result.as_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    table(("table", verb), sorted(result.deleted.items()))
    more = " (more are due: run it again)" if result.partial else ""
    click.echo(f"{verb} {result.total} row(s) in {result.duration:.3f} s{more}")
