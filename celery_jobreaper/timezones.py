"""The time zone of a user table's naive timestamps (``jobreaper_sources[i].timezone``).

A ``started_at`` column without time zone holds wall-clock times of whatever zone the
application wrote them in. jobreaper reads such values in the zone configured for the source
(UTC by default) and hands them on as aware datetimes, so ages, ``max_age``, ``grace`` and
"started before this worker" compare the right instants. The set-based PostgreSQL path
(:mod:`celery_jobreaper.bulk_rule`) does the same in SQL with ``timezone(zone, started_at)``.
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigurationError

UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Zulu", "Etc/Zulu", "GMT", "Etc/GMT"})


def zone_named(key: str, name: Any) -> ZoneInfo | None:
    """Validate an IANA zone name; ``None`` for UTC (naive values are then taken as they are)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(key, f"expected an IANA time zone name, got {name!r}")
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ConfigurationError(
            key,
            f"unknown time zone {name!r} ({error}); use an IANA name such as 'Europe/Berlin' "
            "(the system's zone database, or the tzdata package, must provide it)",
        ) from None
    return None if name in UTC_NAMES else zone


def localize(value: Any, zone: tzinfo | None) -> Any:
    """A naive datetime read from a table in *zone*, as an aware datetime (else *value*).

    A wall-clock time that occurs twice (when clocks go back) or never (when they go forward)
    is given the later of its two possible instants, as PostgreSQL's ``timezone()`` does, so
    both paths agree.
    """
    if zone is None or not isinstance(value, datetime) or value.tzinfo is not None:
        return value
    first = value.replace(tzinfo=zone, fold=0)
    second = value.replace(tzinfo=zone, fold=1)
    offset_first, offset_second = first.utcoffset(), second.utcoffset()
    if offset_first is not None and offset_second is not None and offset_second < offset_first:
        return second
    return first
