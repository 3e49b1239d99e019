"""The texts :mod:`celery_jobreaper.bulk` writes, built in SQL as the Python path writes them.

The error text of a failed job (:func:`~celery_jobreaper.planner.failure_error`, with the
job's age as :func:`~celery_jobreaper.clock.format_age` writes it), cut to the error column as
``apply._fit`` does, and the ledger's values cut to their columns as ``ledger._fit_ledger``
does.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    Interval,
    String,
    Text,
    Uuid,
    bindparam,
    case,
    cast,
    func,
    literal,
)

from . import clock
from .apply import error_length
from .ledger import CUT_MARK, ledger_cut_note
from .planner import failure_error
from .sources.base import SettleTarget


def error_text(
    status: ColumnElement[Any], where: str, started: ColumnElement[Any] | None
) -> ColumnElement[Any]:
    """planner._fail's error text for a row of the table that has (had) *status*.

    *where*: why this run's failures fail; *started*: the row's start as naive UTC
    (:meth:`BulkRule.started_utc <celery_jobreaper.bulk_rule.BulkRule.started_utc>`), or
    ``None`` without the column. The constant pieces are cut out of
    :func:`~celery_jobreaper.planner.failure_error` itself, so the two paths cannot drift apart.
    """
    s, a = "\x00status\x00", "\x00age\x00"
    head, rest = failure_error(s, a, where).split(s)
    mid, tail = rest.split(a)
    bare_head, bare_tail = failure_error(s, None, where).split(s)
    status_text = cast(status, Text)
    bare = _text(bare_head) + status_text + _text(bare_tail)
    if started is None:
        return bare
    age = format_age(bindparam("jr_now", type_=DateTime()) - started)
    aged = _text(head) + status_text + _text(mid) + age + _text(tail)
    return case((started.is_(None), bare), else_=aged)


def fit(text: ColumnElement[str], target: SettleTarget) -> ColumnElement[str]:
    """The error text cut to the error column's length, as ``apply._fit`` does."""
    length = error_length(target)
    if length is None:
        return text
    cut = func.left(text, literal(max(0, length - 1))) + _text(CUT_MARK)
    return case((func.char_length(text) > literal(length), cut), else_=text)


def fit_ledger(
    value: ColumnElement[Any], length: int | None, source_type: Any, name: str
) -> tuple[ColumnElement[Any], ColumnElement[Any] | None]:
    """*value* cut to a ledger column of *length*, and the note for the reason (or ``None``).

    No SQL is added when the source column cannot be longer than the ledger's (an integer
    or UUID id, a string column no longer than it).
    """
    if length is None:
        return value, None
    if isinstance(source_type, (Integer, Uuid)) and length >= 36:
        return value, None
    source_length = getattr(source_type, "length", None)
    if isinstance(source_type, String) and source_length and source_length <= length:
        return value, None
    too_long = func.char_length(value) > literal(length)
    cut = func.left(value, literal(max(0, length - 1))) + _text(CUT_MARK)
    mark = "\x00value\x00"
    head, tail = ledger_cut_note(name, mark).split(mark)
    note = case((too_long, _text(head) + value + _text(tail)), else_=_text(""))
    return case((too_long, cut), else_=value), note


def format_age(age: ColumnElement[Any]) -> ColumnElement[str]:
    """:func:`~celery_jobreaper.clock.format_age` in SQL: ``str(timedelta)`` in whole seconds.

    A difference of two timestamps is an interval of days and a time under 24 hours, which
    ``to_char`` writes as Python does (``SS`` drops the fraction, ``FM`` the zero padding):
    ``0:00:05``, ``2:03:04``, ``1 day, 0:00:00``, ``3 days, 4:05:06``. A negative age is 0.
    """
    return case(
        (age < _interval(timedelta(0)), _text(clock.format_age(timedelta(0)))),
        (age < _interval(timedelta(days=1)), func.to_char(age, _text("FMHH24:MI:SS"))),
        (age < _interval(timedelta(days=2)), func.to_char(age, _text('"1 day, "FMHH24:MI:SS'))),
        else_=func.to_char(age, _text('FMDD" days, "FMHH24:MI:SS')),
    )


def _text(value: str) -> ColumnElement[str]:
    return literal(value, Text)


def _interval(value: timedelta) -> ColumnElement[timedelta]:
    return literal(value, Interval())
