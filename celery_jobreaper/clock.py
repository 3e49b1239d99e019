"""Time helpers: every timestamp celery_jobreaper writes is naive UTC; liveness uses the
database server's clock."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    Interval,
    Text,
    func,
    literal,
    literal_column,
    select,
    type_coerce,
)
from sqlalchemy.engine import Connection


def utcnow() -> datetime:
    """Return the current time as a naive UTC datetime (portable across SQL dialects)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def monotonic() -> float:
    """Seconds of a clock that never steps (``time.monotonic``), for uptimes."""
    return time.monotonic()


def as_naive_utc(value: datetime) -> datetime:
    """Return *value* as naive UTC; aware values are converted, naive ones are taken as UTC."""
    if value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def format_age(age: timedelta) -> str:
    """Format a duration like the seed did: ``1 day, 0:00:00`` (no fractions of a second)."""
    age = max(age, timedelta(0))
    return str(age - timedelta(microseconds=age.microseconds))


def db_now(dialect: str) -> ColumnElement[datetime]:
    """The database server's current time as naive UTC, in SQL (the one clock of liveness).

    Heartbeats are written with it and judged against it, so a host clock that is off makes
    no live worker look dead and keeps no dead one alive. PostgreSQL: ``now() at time zone
    'utc'`` (the transaction's start); MariaDB/MySQL: ``UTC_TIMESTAMP(6)``; SQLite:
    ``strftime('%Y-%m-%d %H:%M:%f', 'now')`` written as SQLAlchemy stores datetimes (six
    digits of fraction, so stored and bound values compare equal); other dialects:
    ``CURRENT_TIMESTAMP``, taken as UTC.
    """
    if dialect == "postgresql":
        expr: ColumnElement[Any] = func.timezone(literal("utc", Text), func.now())
    elif dialect in ("mysql", "mariadb"):
        expr = func.utc_timestamp(6)
    elif dialect == "sqlite":
        expr = func.strftime("%Y-%m-%d %H:%M:%f", "now").concat("000")
    else:
        expr = func.current_timestamp()
    return type_coerce(expr, DateTime())


def db_ago(dialect: str, seconds: float) -> ColumnElement[datetime]:
    """:func:`db_now` less *seconds*, in SQL (compared with values written by :func:`db_now`)."""
    if dialect == "postgresql":
        expr: ColumnElement[Any] = func.timezone(literal("utc", Text), func.now()) - literal(
            timedelta(seconds=seconds), Interval()
        )
    elif dialect in ("mysql", "mariadb"):
        expr = func.timestampadd(
            literal_column("MICROSECOND"),
            literal(-round(seconds * 1e6), Integer()),
            func.utc_timestamp(6),
        )
    elif dialect == "sqlite":
        expr = func.strftime("%Y-%m-%d %H:%M:%f", "now", literal(f"-{seconds:.3f} seconds")).concat(
            "000"
        )
    else:
        expr = func.current_timestamp() - literal(timedelta(seconds=seconds), Interval())
    return type_coerce(expr, DateTime())


def db_utcnow(conn: Connection) -> datetime:
    """The database server's current time (naive UTC), read on *conn*."""
    value: datetime = conn.execute(select(db_now(conn.dialect.name))).scalar_one()
    return as_naive_utc(value)
