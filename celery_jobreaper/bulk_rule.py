"""The planner's rule for rows without owner, in SQL: :mod:`celery_jobreaper.bulk`'s verdicts.

:class:`BulkRule` builds, for one source and one run, the ``CASE`` that judges a row as
:func:`planner.decide <celery_jobreaper.planner.decide>` does on the row's own columns (kind,
started_at) and on the run's constants (bound by :class:`~celery_jobreaper.bulk.BulkSettler`:
``jr_young_after``, ``jr_alone_before``, ``jr_old_before``, ``jr_seen_before``);
:func:`reason_for` names the planner's reason for each verdict that leaves a row alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    false,
    func,
    literal,
    or_,
    true,
)

from .pgarrays import Array
from .planner import (
    START_UNKNOWN_SEEN_BRIEFLY,
    UNOWNED_WHILE_WORKERS_LIVE,
    YOUNGER_THAN_GRACE,
    YOUNGER_THAN_HEARTBEAT_TIMEOUT,
    policy_ignored,
)
from .sources.base import SettleTarget

# Verdicts computed in SQL (the order of planner.decide's rules for rows without owner).
FAIL, IGNORED, YOUNG, UNPROVABLE, ALONE_YOUNG, UNKNOWN_START = 0, 1, 2, 3, 4, 5
LIKE_ESCAPE = "\\"


def glob_to_like(pattern: str) -> str | None:
    """An fnmatch glob as a LIKE pattern (escape ``\\``), or ``None`` if it has ``[``."""
    if "[" in pattern:
        return None
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in ("%", "_", LIKE_ESCAPE):
            out.append(LIKE_ESCAPE + ch)
        else:
            out.append(ch)
    return "".join(out)


def reason_for(verdict: int, kind: str | None) -> str:
    """The planner's reason for leaving a row alone, by verdict."""
    if verdict == IGNORED:
        return policy_ignored(kind)
    if verdict == YOUNG:
        return YOUNGER_THAN_GRACE
    if verdict == ALONE_YOUNG:
        return YOUNGER_THAN_HEARTBEAT_TIMEOUT
    if verdict == UNKNOWN_START:
        return START_UNKNOWN_SEEN_BRIEFLY
    return UNOWNED_WHILE_WORKERS_LIVE


@dataclasses.dataclass(frozen=True, slots=True)
class BulkRule:
    """The rule for one source's rows without owner in one run, as SQL expressions."""

    target: SettleTarget
    kind: Any  #: the kind column, or ``None``
    started: Any  #: the started_at column, or ``None``
    #: ``(LIKE pattern, is 'ignore')`` of each policy glob, in order
    ignore: Sequence[tuple[str, bool]]
    #: no other live worker and this process holds no task (``OwnerlessRule.nobody_could_run``)
    none_live: bool
    has_max_age: bool  #: ``jobreaper_max_age`` is set

    def started_utc(self) -> ColumnElement[Any] | None:
        """started_at as naive UTC (what ``clock.as_naive_utc`` makes of it in Python).

        A naive column is read in the source's zone, as :func:`~celery_jobreaper.timezones.
        localize` does (``timezone(zone, ts)`` takes the later instant of an ambiguous time).
        """
        if self.started is None:
            return None
        if getattr(self.started.type, "timezone", False):
            return func.timezone(literal("UTC", Text), self.started)
        zone = self.target.zone
        if zone is not None:
            local = func.timezone(literal(str(zone), Text), self.started)
            return func.timezone(literal("UTC", Text), local)
        return self.started  # type: ignore[no-any-return]

    def _ignored(self) -> ColumnElement[bool]:
        """The first policy glob matching the kind says 'ignore' (``fnmatchcase`` as LIKE)."""
        if not any(is_ignore for _, is_ignore in self.ignore):
            return false()
        kind = cast(self.kind, Text)
        return case(
            *(
                (kind.like(like, escape=LIKE_ESCAPE), true() if is_ignore else false())
                for like, is_ignore in self.ignore
            ),
            else_=false(),
        )

    def _young(self) -> ColumnElement[bool]:
        """``now - started_at < grace``; never for a NULL started_at."""
        started = self.started_utc()
        if started is None:
            return false()
        return and_(started.is_not(None), started > bindparam("jr_young_after", type_=DateTime()))

    def _start_unknown(self) -> ColumnElement[bool]:
        """A NULL started_at (every row, without the column)."""
        started = self.started_utc()
        return true() if started is None else started.is_(None)

    def _seen_long_enough(self) -> ColumnElement[bool]:
        """The row's id is one of ``jr_seen_before`` (a row whose start is unknown that this
        reaper has seen for the heartbeat timeout: the ids are bound by :meth:`BulkSettler.batch
        <celery_jobreaper.bulk.BulkSettler.batch>`)."""
        t = self.target
        return t.id == any_(bindparam("jr_seen_before", type_=Array(t.id.type)))

    def _provably_stale(self) -> ColumnElement[bool]:
        """No other live worker and ``now - started_at`` over the heartbeat timeout (or, for a
        NULL started_at, seen by this reaper for that long), or ``now - started_at > max_age``
        (:class:`~celery_jobreaper.rules.OwnerlessRule`)."""
        started = self.started_utc()
        if self.none_live:
            if started is None:
                return self._seen_long_enough()
            return or_(
                and_(started.is_(None), self._seen_long_enough()),
                started < bindparam("jr_alone_before", type_=DateTime()),
            )
        if started is None or not self.has_max_age:
            return false()
        return and_(started.is_not(None), started < bindparam("jr_old_before", type_=DateTime()))

    def verdict(self) -> ColumnElement[int]:
        """The row's verdict: :data:`FAIL`, or why it is left alone."""
        whens: list[tuple[ColumnElement[bool], ColumnElement[int]]] = [
            (self._ignored(), literal(IGNORED)),
            (self._young(), literal(YOUNG)),
            (self._provably_stale(), literal(FAIL)),
        ]
        if self.none_live:
            whens.append((self._start_unknown(), literal(UNKNOWN_START)))
        return cast(
            case(*whens, else_=literal(ALONE_YOUNG if self.none_live else UNPROVABLE)),
            Integer,
        )
