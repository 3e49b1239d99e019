"""What every job source provides: owners to judge, candidates in batches, and how to settle."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import ColumnElement, Table, literal, select
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from ..planner import Decision


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A job found in a stale status; whether it really is stale is the planner's call."""

    source: str
    job_id: Any
    status: str
    kind: str | None = None
    started_at: datetime | None = None
    owner: str | None = None  #: Celery node name of the owner, when known
    incarnation_id: str | None = None  #: owner incarnation (tracked jobs only)
    task_id: str | None = None
    #: an opaque value of the row as read (a result row's stored result), compared again
    #: before settling when the target guards the role ``revision``
    revision: Any = None
    #: failed only past ``jobreaper_max_age`` whoever is alive (a result row in ``RETRY``:
    #: its task lives on in its retry message, wherever that waits)
    max_age_only: bool = False


@dataclasses.dataclass(frozen=True)
class SettleTarget:
    """How to compare-and-set a source's rows to failed, for :mod:`celery_jobreaper.apply`."""

    table: Table
    id: ColumnElement[Any]
    status: ColumnElement[Any]
    stale_statuses: tuple[str, ...]
    failed_status: str
    completed_at: ColumnElement[Any] | None
    error: ColumnElement[Any] | None
    #: columns whose value must still equal what the candidate showed (role -> column)
    guards: Mapping[str, ColumnElement[Any]]
    #: extra SET values (column name -> value or SQL expression)
    extra_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: zone of naive ``started_at`` values (the candidates carry them localized), or ``None``
    zone: tzinfo | None = None
    #: per-row SET values made from the decision and the run's time (column name -> value),
    #: e.g. a result row's encoded exception; such a target is updated one row per statement
    row_values: Callable[[Decision, datetime], Mapping[str, Any]] | None = None


class JobSource(Protocol):
    """A table of jobs the reaper can judge and settle."""

    name: str
    target: SettleTarget
    has_owner: bool
    has_task_id: bool

    def owners(self, conn: Connection) -> tuple[set[str], set[str]]:
        """Incarnation ids and node names that own jobs in a stale status."""
        ...

    def batch(self, conn: Connection, after: Any, limit: int) -> list[Candidate]:
        """Up to *limit* jobs in a stale status with id greater than *after*, in id order."""
        ...

    def has_ownerless_stale(self, conn: Connection) -> bool:
        """Whether a job in a stale status has no owner known (one ``LIMIT 1`` probe)."""
        ...

    def stale_summary(self, conn: Connection) -> tuple[int, datetime | None]:
        """How many jobs are in a stale status, and the oldest start among them (naive UTC)."""
        ...


def keyset_batch(
    conn: Connection,
    *,
    id_col: ColumnElement[Any],
    columns: Sequence[Any],
    where: ColumnElement[bool],
    after: Any,
    limit: int,
) -> list[Any]:
    """Rows matching *where* with id above *after* (``None``: from the start), in id order."""
    query = select(*columns).where(where).order_by(id_col).limit(limit)
    if after is not None:
        query = query.where(id_col > after)
    return list(conn.execute(query).all())


def any_stale(conn: Connection, source: JobSource, *also: ColumnElement[bool]) -> bool:
    """Whether *source* has a row in a stale status (and matching *also*): one indexed probe,
    ``LIMIT 1``."""
    target = source.target
    probe = select(literal(1)).where(target.status.in_(target.stale_statuses), *also).limit(1)
    return conn.execute(probe).first() is not None
