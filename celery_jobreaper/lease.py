"""The maintenance lease: one worker of the cluster leads the periodic maintenance.

The periodic reap, the broker sweep of the shared queues, the restore of dead workers' unacked
messages and the pruning of expired revoked ids need one worker per cycle, not every worker:
each of them asks other workers over the control channel, so N workers doing them cost N²
replies. Which worker leads is one row of ``jobreaper_lease`` (one per cluster: per table
prefix), taken and renewed by compare-and-set on the database server's clock, as heartbeats are
(a host clock that is off makes no difference):

- the row names its holder (an incarnation id), until when it holds (``expires_at``), and a
  *generation*, raised on every change of holder;
- a worker takes the lease only if it is free or has expired (``expires_at`` before the
  database's now), in one ``UPDATE … WHERE`` (``INSERT`` for the first holder, the primary key
  deciding between two first holders); the holder renews it with the same statement while it
  still holds its generation;
- every leader-only write transaction calls :meth:`Lease.fence` first: it locks the lease row
  (``SELECT … FOR UPDATE``; on SQLite the transaction's ``BEGIN IMMEDIATE`` already excludes
  every other writer) and checks that this worker still holds *its* generation and that the
  lease has not expired. A takeover is an ``UPDATE`` of that row, so it waits until such a
  transaction has committed, and a transaction that starts after a takeover sees the new
  generation and raises :class:`LeaseLost`. A leader paused past the lease timeout (SIGSTOP, a
  long GC, a partition) and woken up therefore writes nothing as leader, whatever it believed.

Safety never rests on the lease: any number of reapers may run at once (DESIGN §2.3). The
lease bounds the cost; the fence makes "one leader" exact.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from .clock import db_utcnow
from .database import Database
from .schema import JobReaperTables

logger = logging.getLogger(__name__)

#: The lease row of the cluster's periodic maintenance.
MAINTENANCE = "maintenance"


class LeaseLost(RuntimeError):
    """This worker does not (or no longer) hold the lease it acted on."""


@dataclasses.dataclass(frozen=True)
class LeaseState:
    """The lease row as read at *now* (the database's clock)."""

    holder: str  #: incarnation id
    node: str
    generation: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    now: datetime

    @property
    def live(self) -> bool:
        """Whether the lease has not expired."""
        return self.expires_at > self.now

    @property
    def age(self) -> float:
        """Seconds since the current holder took the lease."""
        return max((self.now - self.acquired_at).total_seconds(), 0.0)

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly summary (``inspect jobreaper``, ``jobreaper status``)."""
        return {
            "node": self.node,
            "incarnation": self.holder,
            "generation": self.generation,
            "age": round(self.age, 3),
            "expires_in": round((self.expires_at - self.now).total_seconds(), 3),
            "expired": not self.live,
        }


def read(conn: Connection, tbls: JobReaperTables, name: str = MAINTENANCE) -> LeaseState | None:
    """The lease row *name* now (``None``: nobody ever held it)."""
    now = db_utcnow(conn)
    return _read(conn, tbls, name, now)


def _read(
    conn: Connection,
    tbls: JobReaperTables,
    name: str,
    now: datetime,
    *,
    lock: bool = False,
    nowait: bool = False,
) -> LeaseState | None:
    t = tbls.lease
    query = select(t).where(t.c.name == name)
    if lock and conn.dialect.name != "sqlite":  # (SQLite: BEGIN IMMEDIATE locks the file)
        query = query.with_for_update(nowait=nowait)
    row = conn.execute(query).first()
    if row is None:
        return None
    return LeaseState(
        holder=row.holder,
        node=row.node,
        generation=int(row.generation),
        acquired_at=row.acquired_at,
        renewed_at=row.renewed_at,
        expires_at=row.expires_at,
        now=now,
    )


def _lock_busy(error: sa_exc.OperationalError) -> bool:
    """Whether *error* says a ``FOR UPDATE NOWAIT`` found the row locked (PostgreSQL's
    ``lock_not_available``; MariaDB's lock wait error, MySQL's ``ER_LOCK_NOWAIT``)."""
    orig = error.orig
    if getattr(orig, "sqlstate", None) == "55P03":
        return True
    args: tuple[object, ...] = tuple(getattr(orig, "args", ()))
    return len(args) > 0 and args[0] in (1205, 3572)


class Lease:
    """This worker's side of one lease: take or renew it, fence writes with it, give it up."""

    def __init__(
        self,
        db: Database,
        tbls: JobReaperTables,
        *,
        holder: str,
        node: str,
        timeout: float,
        name: str = MAINTENANCE,
    ) -> None:
        self.db = db
        self.tables = tbls
        self.holder = holder
        self.node = node
        self.timeout = timedelta(seconds=timeout)
        self.name = name
        #: the generation this worker believes it holds (``None``: it does not lead)
        self.generation: int | None = None
        #: the lease as last read or written by :meth:`acquire`
        self.last: LeaseState | None = None

    @property
    def leads(self) -> bool:
        """Whether this worker believes it leads (writes are still fenced: :meth:`fence`)."""
        return self.generation is not None

    def acquire(self, conn: Connection | None = None) -> LeaseState | None:
        """Take the lease if it is free or expired, renew it if this worker holds it.

        One transaction (on *conn*, not in a transaction, if given: the heartbeat's). Returns
        the lease as it is afterwards (``None`` only if it could not be read);
        :attr:`generation` says whether this worker now holds it. A change of holder is logged.
        """
        before = self.generation
        try:
            if conn is None:
                with self.db.connect() as own, own.begin():
                    state = self._acquire(own)
            else:
                with conn.begin():
                    state = self._acquire(conn)
        except sa_exc.IntegrityError:
            # Another worker inserted the first row at the same moment: it holds it.
            state = None
            self.generation = None
        except sa_exc.OperationalError as error:
            if not _lock_busy(error):
                raise
            # A fenced transaction of the leader holds the row (maybe a leader paused in it):
            # never wait for it here -- this runs in the heartbeat thread, and a heartbeat
            # that waits makes a live worker look dead. Try again at the next heartbeat; a
            # leader that could not renew keeps its generation, which the fence checks.
            logger.debug("jobreaper: the maintenance lease is locked; tried again later")
            return self.last
        self.last = state
        if state is not None and state.holder == self.holder:
            self.generation = state.generation
        else:
            self.generation = None
        if self.generation is not None and self.generation != before:
            logger.info(
                "jobreaper: this worker leads the cluster's maintenance now (generation %d)",
                self.generation,
            )
        elif before is not None and self.generation is None:
            logger.warning(
                "jobreaper: this worker no longer leads the cluster's maintenance "
                "(generation %d lost%s)",
                before,
                "" if state is None else f"; {state.node} leads with generation {state.generation}",
            )
        return state

    def _acquire(self, conn: Connection) -> LeaseState | None:
        t = self.tables.lease
        now = db_utcnow(conn)
        state = _read(conn, self.tables, self.name, now)
        expires = now + self.timeout
        if state is None:
            conn.execute(
                insert(t).values(
                    name=self.name,
                    holder=self.holder,
                    node=self.node,
                    generation=1,
                    acquired_at=now,
                    renewed_at=now,
                    expires_at=expires,
                )
            )
            return _read(conn, self.tables, self.name, now)
        mine = self.generation is not None and (
            state.holder == self.holder and state.generation == self.generation
        )
        if not mine and state.live:
            return state  # held by another worker (read without a lock: no wait)
        # About to change the row: lock it first, without waiting (see :meth:`acquire`).
        _read(conn, self.tables, self.name, now, lock=True, nowait=True)
        if mine:
            # Renewal: the same generation, only while it is still ours (not taken meanwhile).
            stmt = (
                update(t)
                .where(
                    t.c.name == self.name,
                    t.c.holder == self.holder,
                    t.c.generation == state.generation,
                )
                .values(renewed_at=now, expires_at=expires)
            )
        else:
            # Takeover of an expired lease (this worker's own expired one too: a new
            # generation, since it may have been fenced out meanwhile).
            stmt = (
                update(t)
                .where(
                    t.c.name == self.name,
                    t.c.generation == state.generation,
                    t.c.expires_at <= now,
                )
                .values(
                    holder=self.holder,
                    node=self.node,
                    generation=state.generation + 1,
                    acquired_at=now,
                    renewed_at=now,
                    expires_at=expires,
                )
            )
        conn.execute(stmt)
        return _read(conn, self.tables, self.name, now)

    def fence(self, conn: Connection) -> int:
        """In the caller's write transaction: lock the lease row and check that this worker
        holds its generation and that the lease has not expired; return the generation.

        Raises :class:`LeaseLost` otherwise (the caller's transaction must roll back), and
        forgets the generation: this worker acts as leader again only once it has taken the
        lease again.
        """
        mine = self.generation
        now = db_utcnow(conn)
        state = _read(conn, self.tables, self.name, now, lock=True)
        if (
            mine is not None
            and state is not None
            and (state.holder == self.holder and state.generation == mine and state.live)
        ):
            return mine
        self.generation = None
        if state is None:
            why = "nobody holds it"
        elif state.holder != self.holder or state.generation != mine:
            why = f"{state.node} holds generation {state.generation}"
        else:
            why = f"it expired {(now - state.expires_at).total_seconds():.1f} s ago"
        raise LeaseLost(
            f"this worker does not hold the maintenance lease (generation {mine}; {why})"
        )

    def release(self) -> None:
        """Give the lease up now (a warm shutdown): another worker may take it at once."""
        mine, self.generation = self.generation, None
        if mine is None:
            return
        t = self.tables.lease
        try:
            with self.db.connect() as conn, conn.begin():
                now = db_utcnow(conn)
                conn.execute(
                    update(t)
                    .where(t.c.name == self.name, t.c.holder == self.holder, t.c.generation == mine)
                    .values(expires_at=now)
                )
        except Exception:
            logger.exception("jobreaper: could not give up the maintenance lease")
            return
        logger.info("jobreaper: this worker gave up the maintenance lease (generation %d)", mine)
