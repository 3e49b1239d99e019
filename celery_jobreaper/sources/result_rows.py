"""Celery's database result backend rows (``celery_taskmeta``) in ``STARTED`` or ``RETRY``.

A ``STARTED`` row (``task_track_started``) holds ``result = {"pid", "hostname"}``, encoded by
the backend, and ``date_done`` NULL; ``worker`` is set only with ``result_extended``. Its owner
is that node name: the worker column when set, else the hostname in the stored result. A
``RETRY`` row is not owned by the worker that ran the attempt which raised ``Retry``: the task
lives on in its retry message, held by whichever worker takes it (or waiting in a queue), so
it is judged like a job without owner (left alone while its message waits or a live worker
holds it). The table has no start time: the start comes from jobreaper's tracked jobs
(``jobreaper_jobs``) when they have the task, else the age is unknown.

Settling writes what Celery would write for a task whose worker was lost: status ``FAILURE``,
``date_done``, and a ``WorkerLostError`` encoded by the backend itself
(``backend.encode(backend.prepare_exception(exc))``) with its traceback text, so
``AsyncResult(id).state == "FAILURE"`` and ``.result`` is that exception. The row is compared
and set on its status and its stored result as read (a task run again since is a new run).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from billiard.exceptions import WorkerLostError
from celery import states
from kombu.utils.encoding import ensure_bytes
from sqlalchemy import ColumnElement, Table, func, null, select
from sqlalchemy.engine import Connection

from ..schema import JobReaperTables
from .base import Candidate, SettleTarget

if TYPE_CHECKING:
    from ..planner import Decision

logger = logging.getLogger(__name__)

#: The statuses of a task that may still be running (or about to run again).
STALE_STATUSES: tuple[str, ...] = (states.STARTED, states.RETRY)


class _Unreadable:
    """An owner that cannot be read from a ``STARTED`` row (such a row is not a candidate)."""


UNREADABLE = _Unreadable()


class ResultRowsSource:
    """Rows of Celery's result table whose task is ``STARTED`` or ``RETRY``."""

    has_owner = True
    has_task_id = True

    def __init__(self, backend: Any, tables: JobReaperTables) -> None:
        self.backend = backend
        t: Table = backend.task_cls.__table__
        self.table = t
        self.name = t.name if t.schema is None else f"{t.schema}.{t.name}"
        self.jobs = tables.jobs
        #: the node name column (filled with ``result_extended`` only)
        self.worker: ColumnElement[Any] | None = t.c.get("worker")
        self.task_name: ColumnElement[Any] | None = t.c.get("name")
        self.target = SettleTarget(
            table=t,
            id=t.c.task_id,
            status=t.c.status,
            stale_statuses=STALE_STATUSES,
            failed_status=states.FAILURE,
            completed_at=t.c.date_done,
            error=None,  # the exception and traceback are per row: see failure_values
            guards={"revision": t.c.result},
            row_values=self.failure_values,
        )
        self.unreadable = 0  #: STARTED rows of the last batch whose owner could not be read

    # --- reading --------------------------------------------------------------------------

    def owner_of(self, status: str, worker: str | None, result: Any) -> str | _Unreadable | None:
        """The node name owning a row: ``None`` for ``RETRY`` (its message holds the task)."""
        if status != states.STARTED:
            return None
        if worker:
            return worker
        if result is None:
            return UNREADABLE
        try:
            meta = self.backend.decode(ensure_bytes(result))
        except Exception:
            return UNREADABLE
        hostname = meta.get("hostname") if isinstance(meta, Mapping) else None
        return hostname if isinstance(hostname, str) and hostname else UNREADABLE

    def _worker(self) -> ColumnElement[Any]:
        return self.worker if self.worker is not None else null()

    def _stale(self) -> ColumnElement[bool]:
        t = self.table
        return t.c.status.in_(STALE_STATUSES) & t.c.task_id.is_not(None)

    def owners(self, conn: Connection) -> tuple[set[str], set[str]]:
        """Node names owning ``STARTED`` rows."""
        t = self.table
        rows = conn.execute(
            select(t.c.status, self._worker(), t.c.result).where(
                t.c.status == states.STARTED, t.c.task_id.is_not(None)
            )
        )
        names = {self.owner_of(*row) for row in rows}
        return set(), {n for n in names if isinstance(n, str)}

    def has_ownerless_stale(self, conn: Connection) -> bool:
        """Whether a ``RETRY`` row exists (judged without owner)."""
        t = self.table
        probe = select(t.c.task_id).where(t.c.status == states.RETRY, t.c.task_id.is_not(None))
        return conn.execute(probe.limit(1)).first() is not None

    def stale_summary(self, conn: Connection) -> tuple[int, datetime | None]:
        """How many rows are ``STARTED``/``RETRY``, and the oldest tracked start among them."""
        t, j = self.table, self.jobs
        count, oldest = conn.execute(
            select(func.count(), func.min(j.c.started_at))
            .select_from(t.outerjoin(j, j.c.task_id == t.c.task_id))
            .where(self._stale())
        ).one()
        return int(count), oldest

    def batch(self, conn: Connection, after: Any, limit: int) -> list[Candidate]:
        """``STARTED``/``RETRY`` rows by task id, with the tracked start when there is one."""
        t, j = self.table, self.jobs
        kind: ColumnElement[Any] = (
            j.c.task_name
            if self.task_name is None
            else func.coalesce(self.task_name, j.c.task_name)
        )
        query = (
            select(t.c.task_id, t.c.status, self._worker(), t.c.result, kind, j.c.started_at)
            .select_from(t.outerjoin(j, j.c.task_id == t.c.task_id))
            .where(self._stale())
            .order_by(t.c.task_id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(t.c.task_id > after)
        out: list[Candidate] = []
        self.unreadable = 0
        for task_id, status, worker, result, name, started in conn.execute(query).all():
            owner = self.owner_of(status, worker, result)
            if isinstance(owner, _Unreadable):
                self.unreadable += 1
                continue
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
                )
            )
        if self.unreadable:
            logger.warning(
                "jobreaper: %d STARTED row(s) of %s name no worker that can be read (neither "
                "the worker column nor the stored result); left alone",
                self.unreadable,
                self.name,
            )
        return out

    # --- settling -------------------------------------------------------------------------

    def failure(self, decision: Decision, now: datetime) -> WorkerLostError:
        """The exception stored on a settled row: which worker was lost, when, and why."""
        c = decision.candidate
        worker = c.owner or "unknown (no worker recorded)"
        return WorkerLostError(
            f"Worker lost: {worker} (found by jobreaper at {now:%Y-%m-%d %H:%M:%S} UTC). "
            f"{decision.error or decision.reason}"
        )

    def failure_values(self, decision: Decision, now: datetime) -> dict[str, Any]:
        """``result`` and ``traceback`` as the backend writes them for this failure."""
        exc = self.failure(decision, now)
        encoded = ensure_bytes(self.backend.encode(self.backend.prepare_exception(exc)))
        text = "".join(traceback.format_exception_only(type(exc), exc))
        t = self.table
        return {t.c.result.name: encoded, t.c.traceback.name: text}
