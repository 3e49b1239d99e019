"""Time helpers: every timestamp celery_jobreaper writes is naive UTC."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


def utcnow() -> datetime:
    """Return the current time as a naive UTC datetime (portable across SQL dialects)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def as_naive_utc(value: datetime) -> datetime:
    """Return *value* as naive UTC; aware values are converted, naive ones are taken as UTC."""
    if value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def format_age(age: timedelta) -> str:
    """Format a duration like the seed did: ``1 day, 0:00:00`` (no fractions of a second)."""
    age = max(age, timedelta(0))
    return str(age - timedelta(microseconds=age.microseconds))
