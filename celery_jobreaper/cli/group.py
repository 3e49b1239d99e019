"""The ``jobreaper`` command group, its exit codes and what every command shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NoReturn

import click
from celery.bin.base import handle_preload_options
from sqlalchemy import exc

from ..database import Database
from ..errors import ConfigurationError
from ..settings import Settings

#: The command did what was asked (a plan or a run with nothing to settle included).
EXIT_OK = 0
#: A reap failed, or the database could not be reached or read.
EXIT_FAILED = 1
#: Wrong usage or invalid configuration (Click's own usage errors exit 2 as well).
EXIT_USAGE = 2
#: ``reap`` was declined at its confirmation prompt: nothing was changed.
EXIT_DECLINED = 3
#: ``--on``: no worker answered, or one that was asked did not report in time.
EXIT_NO_REPORT = 4


@click.group()
@click.pass_context
@handle_preload_options
def jobreaper(ctx: click.Context) -> None:
    """Settle jobs left running by dead workers (celery_jobreaper).

    Exit codes: 0 done; 1 a reap failed or the database could not be read; 2 wrong usage or
    invalid configuration; 3 reap declined at the prompt (nothing changed); 4 (--on) no worker
    answered, or one did not report in time.
    """


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print *message* on stderr and exit with *code*."""
    click.echo(f"jobreaper: {message}", err=True)
    raise SystemExit(code)


def settings_of(ctx: click.Context) -> Settings:
    """The app's validated settings, or exit 2 naming the bad key."""
    try:
        return Settings.from_app(ctx.obj.app)
    except ConfigurationError as error:
        fail(str(error), EXIT_USAGE)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[Database]:
    """The configured database; exits 1 with one line if it cannot be reached or read."""
    try:
        db = Database.from_settings(settings)
    except ConfigurationError as error:
        fail(str(error), EXIT_USAGE)
    try:
        yield db
    except exc.SQLAlchemyError as error:
        fail(f"database {db.url}: {type(error).__name__}: {error.args[0] if error.args else error}")
    finally:
        db.dispose()


def echo_json(value: Any) -> None:
    """Print *value* as indented JSON (datetimes as ISO 8601 UTC with a ``Z``)."""
    import json
    from datetime import datetime

    def default(o: Any) -> Any:
        if isinstance(o, datetime):
            return o.isoformat() + ("Z" if o.tzinfo is None else "")
        return str(o)

    click.echo(json.dumps(value, indent=2, default=default))
