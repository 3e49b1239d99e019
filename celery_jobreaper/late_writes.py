"""Late writes to tables jobreaper does not write alone: detected after the fact, recorded
once, logged and signalled.

Tracked jobs are fenced: a late finish of a settled job changes nothing (see
:mod:`celery_jobreaper.tracking.late`). A user table is written by the application itself, and
a result backend's table by Celery's backend, so jobreaper cannot refuse a late UPDATE there (a
worker paused past its heartbeat timeout wakes up and sets ``completed`` on a row jobreaper
already failed, or its backend stores ``SUCCESS`` over the ``FAILURE``). Instead, every
periodic or manual reap (not the startup one, which must be quick) looks at the rows of those
sources any reaper settled within ``jobreaper_late_write_window`` seconds (the ledger's ``settled``
events, through an index on ``(action, at)``; nothing else is read when there are none) and
records each row whose status is no longer the one jobreaper set, or that still holds it but was
written over since (a result row's ``FAILURE`` whose traceback is no longer jobreaper's: the lost
worker's own failure stored late): one ``late_write`` event, a warning and
:data:`celery_jobreaper.signals.late_result`.

Exactly once with any number of reapers: the settlement's event id is inserted into
``jobreaper_late_writes`` (its primary key) with "on conflict do nothing" in the transaction
that writes the event; only the reaper whose insert added the row writes it. A late write
already recorded is not recorded again by later reaps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Select, any_, bindparam, delete, exists, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Insert

from . import ledger, signals
from .pgarrays import Array, send_arrays_in_binary
from .schema import JobReaperTables
from .textsafe import safe
from .vocabulary import LATE_WRITE, SETTLED

logger = logging.getLogger(__name__)


class Watched(Protocol):
    """A source whose rows others write too (a user table, a result backend's table)."""

    @property
    def name(self) -> str:
        """The source's name (the ledger's ``source``)."""
        ...

    @property
    def cols(self) -> Mapping[str, Any]:
        """Its columns by role: ``id`` and ``status``; ``owner`` and ``task_id`` if it has them."""
        ...

    @property
    def compared(self) -> Mapping[str, Any]:
        """The columns read besides ``id`` and ``status``, by name: ``owner`` and ``task_id``
        if it has them, and whatever tells jobreaper's settlement from a later write."""
        ...

    @property
    def late_write_note(self) -> str:
        """What a late write to it means and what to do (the ledger event's reason ends so)."""
        ...

    def is_late_write(self, status: str, values: Mapping[str, Any], owner: str | None) -> bool:
        """Whether a settled row now holding *status* (and *values* by role) was written by
        the settled run's late owner *owner* (not by a new run, nor by jobreaper's own fence)."""
        ...

    def is_new_run(self, status: str, values: Mapping[str, Any], owner: str | None) -> bool:
        """Whether the row now holds a new run of the task (not the settled run's late owner
        *owner*): the settlement is then done with, and later writes are that run's."""
        ...

    def is_written_over(self, values: Mapping[str, Any], settled_reason: str) -> bool:
        """Whether a settled row still holding the status jobreaper set was written again
        since (*values*: :attr:`compared` by name): the same status, another outcome.
        *settled_reason*: the settlement's ledger reason (why jobreaper failed it)."""
        ...


#: Ids asked about in one ``IN (…)`` list.
_CHUNK = 500


@dataclasses.dataclass(frozen=True, slots=True)
class LateWrite:
    """A settled row written afterwards by someone else (recorded in the ledger): its status
    changed, or it holds the same status with another outcome (a result row's ``FAILURE``)."""

    source: str
    job_id: str
    settled_as: str  #: the status jobreaper set
    settled_at: datetime
    status: str  #: the status the row holds now
    task_id: str | None
    owner: str | None
    kind: str | None
    note: str = ""  #: the source's :attr:`Watched.late_write_note`


def detect(
    conn: Connection,
    tables: JobReaperTables,
    sources: Sequence[Watched],
    *,
    now: datetime,
    window: float,
    run_id: int | None,
) -> list[LateWrite]:
    """Record the late writes to rows settled in the last *window* seconds (call inside a
    transaction); return them, for :func:`report` after the commit."""
    by_name = {s.name: s for s in sources}
    if not by_name or window <= 0:
        return []
    recent = conn.execute(
        _recent(tables),
        {
            "jr_since": now - timedelta(seconds=window),
            "jr_sources": list(by_name),
            # this run's own settlements (stamped with its time) are checked by the next run,
            # not read back now; an earlier one stamped the same second waits for it too
            "jr_until": now,
        },
    ).all()
    if not recent:
        return []
    latest: dict[tuple[str, str], Any] = {(row.source, row.job_id): row for row in recent}
    found: list[LateWrite] = []
    for name, source in by_name.items():
        settled = [row for (src, _), row in latest.items() if src == name]
        if settled:
            found += _check_source(conn, tables, source, settled, now=now, run_id=run_id)
    if found:  # marks of settlements gone out of every window are kept by nobody
        marks = tables.late_writes
        conn.execute(delete(marks).where(marks.c.detected_at < now - timedelta(seconds=2 * window)))
    return found


@functools.lru_cache(maxsize=8)
def _recent(tables: JobReaperTables) -> Select[Any]:
    """Unrecorded latest settlements since ``:jr_since`` of the sources ``:jr_sources`` (built
    once: an idle reap pays for one indexed query, not for building it)."""
    ev, marks = tables.events, tables.late_writes
    later = ev.alias("jr_later")
    return (
        select(
            ev.c.id,
            ev.c.source,
            ev.c.job_id,
            ev.c.new_status,
            ev.c.at,
            ev.c.task_id,
            ev.c.owner,
            ev.c.kind,
            ev.c.reason,
        )
        .where(
            ev.c.action == SETTLED,
            ev.c.at >= bindparam("jr_since", type_=ev.c.at.type),
            ev.c.at < bindparam("jr_until", type_=ev.c.at.type),
            ev.c.source.in_(bindparam("jr_sources", expanding=True)),
            ~exists().where(marks.c.event_id == ev.c.id),
            # only a job's latest settlement: an earlier one's row was written again since
            # (by the application's next run, which was settled again)
            ~exists().where(
                later.c.source == ev.c.source,
                later.c.job_id == ev.c.job_id,
                later.c.action == SETTLED,
                later.c.id > ev.c.id,
            ),
        )
        .order_by(ev.c.id)
    )


def _check_source(
    conn: Connection,
    tables: JobReaperTables,
    source: Watched,
    settled: list[Any],
    *,
    now: datetime,
    run_id: int | None,
) -> list[LateWrite]:
    id_col, status_col = source.cols["id"], source.cols["status"]
    roles = list(source.compared)
    extra = [source.compared[r] for r in roles]
    by_key: dict[str, Any] = {row.job_id: row for row in settled}
    current: dict[str, tuple[Any, ...]] = {}
    ids = [x for x in (_as_id(id_col, k) for k in by_key) if x is not None]
    read = select(id_col, status_col, *extra)
    if conn.dialect.name == "postgresql":  # one statement, the ids as one (binary) array
        send_arrays_in_binary(conn)
        chunks = [read.where(id_col == any_(bindparam("jr_ids", ids, type_=Array(id_col.type))))]
    else:
        chunks = [read.where(id_col.in_(ids[i : i + _CHUNK])) for i in range(0, len(ids), _CHUNK)]
    for stmt in chunks:
        for row in conn.execute(stmt):
            current[str(row[0])] = tuple(row[1:])
    found: list[LateWrite] = []
    for key, row in by_key.items():
        now_row = current.get(key)
        if now_row is None or now_row[0] is None:
            continue  # deleted: no late result to record
        values = dict(zip(roles, now_row[1:], strict=True))
        status = str(now_row[0])
        if status == row.new_status and not source.is_written_over(values, row.reason or ""):
            continue  # unchanged
        if source.is_new_run(status, values, row.owner):
            _claim(conn, tables, row.id, now)  # done with: later writes are the new run's
            continue
        if not source.is_late_write(status, values, row.owner):
            continue
        late = LateWrite(
            source=source.name,
            job_id=key,
            settled_as=row.new_status,
            settled_at=row.at,
            status=status,
            task_id=row.task_id or _text(values.get("task_id")),
            owner=row.owner or _text(values.get("owner")),
            kind=row.kind,
            note=source.late_write_note,
        )
        if _claim(conn, tables, row.id, now):
            found.append(late)
    ledger.write(conn, tables, [_event(w) for w in found], now=now, run_id=run_id)
    return found


def _claim(conn: Connection, tables: JobReaperTables, event_id: int, now: datetime) -> bool:
    """Insert the settlement's mark unless a concurrent reaper did; whether this one did."""
    marks = tables.late_writes
    values = {"event_id": event_id, "detected_at": now}
    name = conn.dialect.name
    stmt: Insert
    if name == "postgresql":  # (its rowcount is not reported here: RETURNING says)
        added = postgresql.insert(marks).values(values).on_conflict_do_nothing()
        return conn.execute(added.returning(marks.c.event_id)).first() is not None
    if name == "sqlite":
        stmt = sqlite.insert(marks).values(values).on_conflict_do_nothing()
    elif name in {"mysql", "mariadb"}:
        stmt = insert(marks).values(values).prefix_with("IGNORE")
    else:  # any other database: the primary key refuses the second insert
        try:
            with conn.begin_nested():
                conn.execute(insert(marks).values(values))
        except Exception:
            return False
        return True
    return bool(conn.execute(stmt).rowcount == 1)


def _as_id(column: Any, key: str) -> Any:
    """The ledger's text job id as the id column's Python value (``None``: not one)."""
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return key
    if kind is str:
        return key
    try:
        return kind(key)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _event(w: LateWrite) -> ledger.Event:
    return ledger.Event(
        action=LATE_WRITE,
        source=w.source,
        job_id=w.job_id,
        reason=(
            f"late write: {_what(w)} after jobreaper had settled it as "
            f"{w.settled_as!r} at {w.settled_at:%Y-%m-%d %H:%M:%S} UTC ({w.note})"
        ),
        task_id=w.task_id,
        kind=w.kind,
        previous_status=w.settled_as,
        new_status=w.status,
        owner=w.owner,
    )


def _what(w: LateWrite) -> str:
    """What was written: another status, or the same status with another outcome."""
    if w.status == w.settled_as:
        return f"written over with another {w.status!r} (not jobreaper's)"
    return f"status set to {w.status!r}"


def _now_holds(w: LateWrite) -> str:
    if w.status == w.settled_as:
        return f"it holds another {safe(w.status)} (not jobreaper's)"
    return f"its status is now {safe(w.status)}"


def report(sender: Any, found: Sequence[LateWrite]) -> None:
    """After the commit: log each late write and send :data:`signals.late_result`."""
    for w in found:
        logger.warning(
            "jobreaper: late write to %s job %s: %s, after jobreaper had "
            "settled it as %s at %s UTC (owner %s, task %s); %s; recorded in the ledger",
            safe(w.source),
            safe(w.job_id),
            _now_holds(w),
            safe(w.settled_as),
            f"{w.settled_at:%Y-%m-%d %H:%M:%S}",
            safe(w.owner),
            safe(w.task_id),
            w.note,
        )
        signals.late_result.send(
            sender=sender,
            task_id=w.task_id,
            status=w.status,
            node=w.owner,
            source=w.source,
            job_id=w.job_id,
        )
