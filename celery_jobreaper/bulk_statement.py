"""The statement that settles one batch of a source on the set-based path (:mod:`.bulk`):
the page locked, the UPDATE of the rows the rule fails, their ledger events, and the rows that
tell the caller what happened, each tagged (a verdict of :mod:`.bulk_rule`, or a tag below)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    cast,
    column,
    func,
    insert,
    literal,
    null,
    select,
    union_all,
    update,
)

from .apply import error_length
from .bulk_rule import FAIL, UNKNOWN_START
from .bulk_text import error_text, fit, fit_ledger
from .ledger import ledger_length
from .sources.base import SettleTarget
from .vocabulary import SETTLED

if TYPE_CHECKING:
    from .bulk import BulkSettler

#: Tags of the result rows besides verdicts: a settled job, the page summary, and a row whose
#: start is unknown left alone (its id, to note as seen: see :mod:`.sightings`).
SETTLED_TAG, PAGE_TAG, SEEN_TAG = -1, -2, -3


def stale(target: SettleTarget, *, after: bool) -> ColumnElement[bool]:
    """A row in a stale status (with an id above ``:jr_after`` if *after*)."""
    t = target
    where: ColumnElement[bool] = t.status.in_(t.stale_statuses)
    if after:
        where = and_(where, t.id > bindparam("jr_after", type_=t.id.type))
    return where


def kind_text(kind: Any) -> ColumnElement[Any]:
    """The kind column as text (a NULL text without one)."""
    return cast(null(), Text) if kind is None else cast(kind, Text)


def batch_statement(settler: BulkSettler, *, after: bool, detail: bool) -> Any:
    """The one statement that settles a batch of *settler*'s source (see :mod:`.bulk`)."""
    target, ev, where = settler.target, settler.events, settler.where
    assert where is not None
    # Locking the page itself (LIMIT over the rows not locked by another reaper) keeps
    # the keyset exact: a page shorter than the batch size means no unlocked stale row
    # is left after it. Rows changed since the statement began are re-checked as locked.
    # PostgreSQL's row address (a system column, not from configuration):
    ctid: ColumnElement[Any] = column("ctid", _selectable=target.table)
    page = (
        select(
            ctid.label("jr_ctid"),
            target.id.label("jr_id"),
            target.status.label("jr_status"),
            kind_text(settler.kind).label("jr_kind"),
            settler.sql_rule.verdict().label("jr_verdict"),
        )
        .where(stale(target, after=after))
        .order_by(target.id)
        .limit(settler.batch_size)
        .with_for_update(skip_locked=True)
        .cte("jr_page")
    )
    # In SET the row's columns are the old values, in RETURNING the new ones: the old
    # status comes from the page (the row is locked: it is the same).
    values: dict[str, Any] = {
        target.status.name: literal(target.failed_status, target.status.type),
        **target.extra_values,
    }
    if target.completed_at is not None:
        values[target.completed_at.name] = bindparam("jr_completed", type_=target.completed_at.type)
    if target.error is not None:
        values[target.error.name] = fit(
            error_text(target.status, where, settler.sql_rule.started_utc()), target
        )
    if target.error is not None and error_length(target) is None:
        error = target.error  # the text as stored is the whole text
    else:
        error = error_text(page.c.jr_status, where, settler.sql_rule.started_utc())
    upd = (
        update(target.table)
        # By address: the row version locked above, without a second index search. The
        # id and the status are compared too: a row that moved is skipped, never mistaken.
        .where(
            ctid == page.c.jr_ctid,
            target.id == page.c.jr_id,
            page.c.jr_verdict == literal(FAIL),
            stale(target, after=False),
        )
        .values(**values)
        .returning(
            target.id.label("jr_id"),
            page.c.jr_status,
            kind_text(settler.kind).label("jr_kind"),
            (null() if settler.started is None else settler.started).label("jr_started"),
            error.label("jr_error"),
        )
        .cte("jr_upd")
    )
    # Values longer than their ledger column are cut and the whole value noted in the
    # reason, as ledger._fit_ledger does (only where the source column can be longer).
    notes: list[ColumnElement[Any]] = []
    fitted: dict[str, ColumnElement[Any]] = {}
    for name, value, source_type in (
        ("job_id", cast(upd.c.jr_id, Text), target.id.type),
        ("source", literal(settler.source.name, Text), String(len(settler.source.name))),
        ("kind", upd.c.jr_kind, String(1) if settler.kind is None else settler.kind.type),
        ("previous_status", cast(upd.c.jr_status, Text), target.status.type),
    ):
        fitted[name], note = fit_ledger(value, ledger_length(ev.c[name]), source_type, name)
        if note is not None:
            notes.append(note)
    reason: ColumnElement[Any] = upd.c.jr_error
    for note in notes:
        reason = reason + note
    event: dict[str, Any] = {
        "run_id": bindparam("jr_run_id", type_=ev.c.run_id.type),
        "at": bindparam("jr_now", type_=DateTime()),
        "source": fitted["source"],
        "job_id": fitted["job_id"],
        "task_id": null(),
        "kind": fitted["kind"],
        "previous_status": fitted["previous_status"],
        "new_status": literal(target.failed_status, ev.c.new_status.type),
        "action": literal(SETTLED, ev.c.action.type),
        "reason": reason,
        "owner": null(),
    }
    ins = insert(ev).from_select(list(event), select(*event.values()).select_from(upd))
    no_id = cast(null(), target.id.type)
    if detail:
        settled = select(
            tag(SETTLED_TAG).label("jr_tag"),
            upd.c.jr_id,
            upd.c.jr_status,
            upd.c.jr_kind,
            upd.c.jr_started,
            upd.c.jr_error,
            cast(null(), BigInteger).label("jr_count"),
        )
    else:
        settled = select(
            tag(SETTLED_TAG).label("jr_tag"),
            no_id.label("jr_id"),
            null(),
            null(),
            null(),
            null(),
            cast(func.count(), BigInteger).label("jr_count"),
        ).select_from(upd)
    left = (
        select(
            page.c.jr_verdict,
            no_id,
            null(),
            page.c.jr_kind,
            null(),
            null(),
            cast(func.count(), BigInteger),
        )
        .where(page.c.jr_verdict != literal(FAIL))
        .group_by(page.c.jr_verdict, page.c.jr_kind)
    )
    last = select(page.c.jr_id).order_by(page.c.jr_id.desc()).limit(1).scalar_subquery()
    summary = select(
        tag(PAGE_TAG), last, null(), null(), null(), null(), cast(func.count(), BigInteger)
    ).select_from(page)
    parts = [settled, left, summary]
    if settler.none_live:  # the ids of rows whose start is unknown, not seen long enough
        parts.append(
            select(
                tag(SEEN_TAG),
                page.c.jr_id,
                null(),
                null(),
                null(),
                null(),
                cast(null(), BigInteger),
            ).where(page.c.jr_verdict == literal(UNKNOWN_START))
        )
    return union_all(*parts).add_cte(ins.cte("jr_ins"))


def tag(value: int) -> ColumnElement[int]:
    """A result row's tag (a verdict, or one of the tags above) as an integer."""
    return cast(literal(value), Integer)
