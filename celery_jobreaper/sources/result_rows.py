"""Result backend rows (Celery's ``celery_taskmeta``, django-celery-results' ``TaskResult``) in
``STARTED`` or ``RETRY``.

A ``STARTED`` row (``task_track_started``) holds the encoded result ``{"pid", "hostname"}``;
``worker`` is set only with ``result_extended``. Its owner is that node name: the worker column
when set, else the hostname in the stored result. A ``RETRY`` row is not owned by the worker
that ran the attempt which raised ``Retry``: the task lives on in its retry message, held by
whichever worker takes it (or waiting in a queue), so it is judged like a job without owner
(left alone while its message waits or a live worker holds it). The start time is the row's
own when the backend stores one (django-celery-results' ``date_started``), else jobreaper's
tracked job's (``jobreaper_jobs``) when there is one, else unknown.

Settling writes what the backend would write for a task whose worker was lost: status
``FAILURE``, ``date_done``, and a ``WorkerLostError`` encoded by the backend itself (see
:mod:`.result_codecs`), with its traceback text, so ``AsyncResult(id).state == "FAILURE"`` and
``.result`` is that exception. The row is compared and set on its status and its stored result
as read (a task run again since is a new run).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from billiard.exceptions import WorkerLostError
from celery import states
from sqlalchemy import ColumnElement, Table, func, null, select
from sqlalchemy.engine import Connection

from ..clock import as_naive_utc
from ..planner import POOL_PROCESS_LOST
from ..schema import JobReaperTables
from ..textsafe import safe
from .base import Candidate, SettleTarget
from .result_codecs import traceback_text

if TYPE_CHECKING:
    from ..planner import Decision

logger = logging.getLogger(__name__)

#: The statuses of a task that may still be running (or about to run again).
STALE_STATUSES: tuple[str, ...] = (states.STARTED, states.RETRY)

#: Text in the message of the failure jobreaper stores on a settled row (see
#: :meth:`ResultRowsSource.failure`).
FOUND_BY = "(found by jobreaper at "
#: How the traceback jobreaper stores begins: the exception alone (it was not raised), where
#: a task's own stored failure has a whole traceback (``Traceback (most recent call last):``).
OWN_TRACEBACK = traceback_text(WorkerLostError("Worker lost: ")).rstrip("\n")
#: Exceptions with which Celery's worker itself reports the loss of a pool process.
LOSS_REPORTS = frozenset({"WorkerLostError", "TimeLimitExceeded"})


class ResultCodec(Protocol):
    """How one result backend stores a row: its table, the owner in it, a failure's values."""

    table: Table
    #: columns read with ``result`` to decode it (e.g. ``content_encoding``)
    decode_columns: Sequence[str]
    #: the column holding the task's start time, if the backend writes one
    started_column: str | None

    def hostname(self, result: Any, extra: Sequence[Any]) -> str | None:
        """The ``hostname`` stored in a ``STARTED`` row's result (may raise if unreadable)."""
        ...

    def decode(self, result: Any, extra: Sequence[Any]) -> Any:
        """The stored result as the backend decodes it (may raise if unreadable)."""
        ...

    def failure_values(self, exc: BaseException, now: datetime) -> dict[str, Any]:
        """Column -> value of the failed row (result, traceback, ``date_done`` …)."""
        ...


class _Unreadable:
    """An owner that cannot be read from a ``STARTED`` row (such a row is not a candidate)."""


UNREADABLE = _Unreadable()


class ResultRowsSource:
    """Rows of a result backend's table whose task is ``STARTED`` or ``RETRY``."""

    has_owner = True
    has_task_id = True
    #: a late write's meaning (:mod:`celery_jobreaper.late_writes`)
    late_write_note = (
        "Celery's result backend stored the task's outcome over the failure: the worker found "
        "dead finished the task after all, or the task id ran again (a backend's writes "
        "cannot be fenced)"
    )

    def __init__(self, codec: ResultCodec, tables: JobReaperTables) -> None:
        self.codec = codec
        t = codec.table
        self.table = t
        self.name = t.name if t.schema is None else f"{t.schema}.{t.name}"
        self.jobs = tables.jobs
        #: the node name column (filled with ``result_extended`` only)
        self.worker: ColumnElement[Any] = t.c["worker"] if "worker" in t.c else null()
        names = [c for c in ("name", "task_name") if c in t.c]
        self.task_name: ColumnElement[Any] | None = t.c[names[0]] if names else None
        self.extra = [t.c[name] for name in codec.decode_columns]
        started = codec.started_column
        self.started: ColumnElement[Any] = t.c[started] if started else null()
        #: columns by role, for :mod:`celery_jobreaper.late_writes`
        self.cols: dict[str, Any] = {
            "id": t.c.task_id,
            "status": t.c.status,
            "task_id": t.c.task_id,
        }
        if "worker" in t.c:
            self.cols["owner"] = t.c["worker"]
        #: columns read to tell jobreaper's settlement from a later write (late_writes)
        self.compared: dict[str, Any] = {
            role: self.cols[role] for role in ("owner", "task_id") if role in self.cols
        }
        self.compared["result"] = t.c.result
        self.compared.update((c.name, c) for c in self.extra)
        if "traceback" in t.c:
            self.compared["traceback"] = t.c["traceback"]
        self.target = SettleTarget(
            table=t,
            id=t.c.task_id,
            status=t.c.status,
            stale_statuses=STALE_STATUSES,
            failed_status=states.FAILURE,
            completed_at=None,  # date_done is the codec's (aware or naive, as the column is)
            error=None,  # the exception and traceback are per row: see failure_values
            guards={"revision": t.c.result},
            row_values=self.failure_values,
        )

    def is_late_write(self, status: str, values: Mapping[str, Any], owner: str | None) -> bool:
        """An outcome the lost worker stored after all (``SUCCESS``, ``FAILURE``, ``RETRY`` …).

        Not: ``REVOKED`` (a live worker discarding the settled task's redelivered message: the
        settle's own revoke at work), nor a row whose ``worker`` column (``result_extended``)
        names another node than the lost one (a new run). With that column naming the lost node,
        or without it, any other state is recorded (a ``RETRY`` the woken task asked for too),
        though a new run's outcome cannot always be told from a late one (its reason says both).
        ``STARTED`` of a settled ``STARTED`` row is a new run (:meth:`is_new_run`); of a settled
        ``RETRY`` row (no owner) it is the retry running after all: its outcome is awaited.
        """
        worker = values.get("owner")
        if worker and owner:  # the worker column says whose write it is
            return str(worker) == owner and status != states.REVOKED
        return status not in (states.STARTED, states.REVOKED)

    def is_new_run(self, status: str, values: Mapping[str, Any], owner: str | None) -> bool:
        """``STARTED`` over jobreaper's ``FAILURE``: the task id runs again, whatever the node
        (an app that reuses task ids, a worker restarted under the same name, or the retry of
        a woken worker's run, whose ``RETRY`` was recorded if a reap saw it). The settled run
        itself wrote ``STARTED`` once, before it was settled, and never writes it again; its
        later outcomes are the new run's, not late writes of the lost worker. (A settled
        ``RETRY`` row has no owner: see :meth:`is_late_write`.)"""
        return status == states.STARTED and owner is not None

    def is_written_over(self, values: Mapping[str, Any], settled_reason: str) -> bool:
        """A ``FAILURE`` that is not the one jobreaper stored: the task's own failure (the
        lost worker's, or a new run's) stored after the settlement.

        jobreaper's own has the bare ``WorkerLostError: Worker lost: … (found by jobreaper
        at …)`` line as its traceback (a task that re-raises or chains that error has a whole
        traceback). Not written over either: Celery's worker reporting the loss of a pool
        process (a ``WorkerLostError`` or ``TimeLimitExceeded`` stored without a traceback)
        over jobreaper's settlement of that same loss (:data:`~celery_jobreaper.planner.
        POOL_PROCESS_LOST`: Celery lets go of the task first and stores its report just after,
        so a reap of that worker may settle the row in between). The same report over any
        other settlement comes from a worker found dead that woke up: written over.
        """
        if "traceback" not in values:
            return False  # no column to tell them apart: the status alone decides
        text = str(values["traceback"] or "")
        first = text.split("\n", 1)[0]
        if first.startswith(OWN_TRACEBACK) and FOUND_BY in first:
            return False
        if text.strip() or POOL_PROCESS_LOST not in settled_reason:
            return True
        reported = self._exception(values)
        return not (
            reported is not None and reported[0] in LOSS_REPORTS and FOUND_BY not in reported[1]
        )

    def _exception(self, values: Mapping[str, Any]) -> tuple[str, str] | None:
        """The stored exception's class name and message (``None``: unreadable)."""
        extra = [values.get(c.name) for c in self.extra]
        try:
            stored = self.codec.decode(values.get("result"), extra)
            if isinstance(stored, BaseException):  # a pickled exception
                return type(stored).__name__, str(stored)
            if isinstance(stored, dict) and "exc_type" in stored:
                name = str(stored["exc_type"]).rsplit(".", 1)[-1]
                return name, str(stored.get("exc_message"))
        except Exception:
            return None
        return None

    # --- reading --------------------------------------------------------------------------

    def owner_of(
        self, status: str, worker: str | None, result: Any, extra: Sequence[Any] = ()
    ) -> str | _Unreadable | None:
        """The node name owning a row: ``None`` for ``RETRY`` (its message holds the task)."""
        if status != states.STARTED:
            return None
        if worker:
            return worker
        try:
            hostname = None if result is None else self.codec.hostname(result, extra)
        except Exception:
            hostname = None
        return hostname if isinstance(hostname, str) and hostname else UNREADABLE

    def _stale(self) -> ColumnElement[bool]:
        t = self.table
        return t.c.status.in_(STALE_STATUSES) & t.c.task_id.is_not(None)

    def owners(self, conn: Connection) -> tuple[set[str], set[str]]:
        """Node names owning ``STARTED`` rows."""
        t = self.table
        rows = conn.execute(
            select(t.c.status, self.worker, t.c.result, *self.extra).where(
                t.c.status == states.STARTED, t.c.task_id.is_not(None)
            )
        )
        names = {self.owner_of(r[0], r[1], r[2], tuple(r[3:])) for r in rows}
        return set(), {n for n in names if isinstance(n, str)}

    def has_ownerless_stale(self, conn: Connection) -> bool:
        """No row here is judged by the rule for jobs without owner (a ``RETRY`` row only
        past ``jobreaper_max_age``): no ping of every worker is needed for this table."""
        return False

    def stale_summary(self, conn: Connection) -> tuple[int, datetime | None]:
        """How many rows are ``STARTED``/``RETRY``, and the oldest known start among them."""
        t, j = self.table, self.jobs
        count, own, tracked = conn.execute(
            select(func.count(), func.min(self.started), func.min(j.c.started_at))
            .select_from(t.outerjoin(j, j.c.task_id == t.c.task_id))
            .where(self._stale())
        ).one()
        starts = [as_naive_utc(s) for s in (own, tracked) if isinstance(s, datetime)]
        return int(count), min(starts, default=None)

    def batch(self, conn: Connection, after: Any, limit: int) -> list[Candidate]:
        """``STARTED``/``RETRY`` rows by task id, with the start time when one is known."""
        t, j = self.table, self.jobs
        kind: ColumnElement[Any] = (
            j.c.task_name
            if self.task_name is None
            else func.coalesce(self.task_name, j.c.task_name)
        )
        query = (
            select(
                t.c.task_id,
                t.c.status,
                self.worker,
                t.c.result,
                kind,
                self.started,
                j.c.started_at,
                *self.extra,
            )
            .select_from(t.outerjoin(j, j.c.task_id == t.c.task_id))
            .where(self._stale())
            .order_by(t.c.task_id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(t.c.task_id > after)
        out: list[Candidate] = []
        unreadable = 0
        for row in conn.execute(query).all():
            task_id, status, worker, result, name, own_start, tracked_start = row[:7]
            owner = self.owner_of(status, worker, result, tuple(row[7:]))
            if isinstance(owner, _Unreadable):
                unreadable += 1
                continue
            started = own_start if own_start is not None else tracked_start
            out.append(
                Candidate(
                    self.name,
                    task_id,
                    status,
                    None if name is None else str(name),
                    started,
                    owner,
                    None,
                    task_id,
                    result,
                    max_age_only=status == states.RETRY,
                )
            )
        if unreadable:
            logger.warning(
                "jobreaper: %d STARTED row(s) of %s name no worker that can be read (neither "
                "the worker column nor the stored result); left alone",
                unreadable,
                safe(self.name),
            )
        return out

    # --- settling -------------------------------------------------------------------------

    def failure(self, decision: Decision, now: datetime) -> WorkerLostError:
        """The exception stored on a settled row: which worker was lost, when, and why."""
        c = decision.candidate
        worker = c.owner or "unknown (no worker recorded)"
        return WorkerLostError(
            f"Worker lost: {worker} {FOUND_BY}{now:%Y-%m-%d %H:%M:%S} UTC). "
            f"{decision.error or decision.reason}"
        )

    def failure_values(self, decision: Decision, now: datetime) -> dict[str, Any]:
        """The failed row's values, as the backend writes them for this failure."""
        return self.codec.failure_values(self.failure(decision, now), now)
