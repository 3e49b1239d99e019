"""Durable revoked task ids: Celery keeps them only in live workers' memory; we keep them in SQL."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection

from .clock import utcnow
from .database import Database
from .schema import JobReaperTables, tables
from .settings import Settings
from .textsafe import safe
from .workerstate import revoked_ids, settled_ids

logger = logging.getLogger(__name__)


def record(
    conn: Connection,
    tbls: JobReaperTables,
    task_ids: Iterable[str],
    *,
    expires: float,
    node: str | None,
    now: datetime | None = None,
) -> int:
    """Store *task_ids* as revoked for *expires* seconds; ids already stored stay as they are."""
    now = now or utcnow()
    rows = [
        {
            "task_id": i,
            "revoked_at": now,
            "expires_at": now + timedelta(seconds=expires),
            "node": node,
        }
        for i in dict.fromkeys(task_ids)
    ]
    if not rows:
        return 0
    t = tbls.revoked
    name = conn.dialect.name
    stmt: Any
    if name == "postgresql":
        stmt = postgresql.insert(t).on_conflict_do_nothing(index_elements=[t.c.task_id])
    elif name == "sqlite":
        stmt = sqlite.insert(t).on_conflict_do_nothing(index_elements=[t.c.task_id])
    elif name in {"mysql", "mariadb"}:
        stmt = mysql.insert(t).prefix_with("IGNORE")
    else:  # portable fallback: insert only what is not there yet
        known = set(
            conn.execute(
                select(t.c.task_id).where(t.c.task_id.in_([r["task_id"] for r in rows]))
            ).scalars()
        )
        rows = [r for r in rows if r["task_id"] not in known]
        stmt = insert(t)
        if not rows:
            return 0
    conn.execute(stmt, rows)
    return len(rows)


#: The ``node`` of a revoked row written by a settle (not by a user's revoke): such a row is
#: removed again once the settled job's message is gone (see :func:`forget_settled`).
SETTLED_NODE = "jobreaper:settled"


def record_settled(
    conn: Connection,
    tbls: JobReaperTables,
    task_ids: Iterable[str | None],
    *,
    expires: float,
    now: datetime | None = None,
) -> int:
    """Revoke the tasks of jobs settled as failed, in the settle's own transaction.

    Written with the settle (not after it), so that neither a crash before the broker sweep
    nor ``jobreaper_queue_cleanup = "off"``/``"purge"`` loses them: every jobreaper worker
    merges the table into its in-memory revoked set and discards such a message if it ever
    comes back (an ``acks_late`` message restored from a dead worker). An id a user already
    revoked keeps the user's row.
    """
    ids = [i for i in task_ids if i]
    limit = getattr(tbls.revoked.c.task_id.type, "length", None)
    too_long = [i for i in ids if limit is not None and len(i) > limit]
    if too_long:  # cannot be a key of the table; the settle itself must not fail for it
        logger.warning(
            "jobreaper: %d settled task id(s) longer than %d characters cannot be revoked "
            "durably (their messages are still removed by the sweep): %s",
            len(too_long),
            limit,
            ", ".join(safe(i) for i in too_long[:5]),
        )
        ids = [i for i in ids if i not in too_long]
    if not ids:
        return 0
    return record(conn, tbls, ids, expires=expires, node=SETTLED_NODE, now=now)


def active_settled(
    conn: Connection, tbls: JobReaperTables, now: datetime | None = None
) -> set[str]:
    """Revoked ids written by a settle (see :func:`record_settled`) that have not expired."""
    t = tbls.revoked
    return set(
        conn.execute(
            select(t.c.task_id).where(t.c.expires_at > (now or utcnow()), t.c.node == SETTLED_NODE)
        ).scalars()
    )


def forget_settled(conn: Connection, tbls: JobReaperTables, task_ids: Iterable[str]) -> int:
    """Un-revoke settled jobs' task ids whose message is gone (a user's revoke stays)."""
    ids = list(dict.fromkeys(task_ids))
    if not ids:
        return 0
    t = tbls.revoked
    stmt = delete(t).where(t.c.task_id.in_(ids), t.c.node == SETTLED_NODE)
    return int(conn.execute(stmt).rowcount or 0)


def active(conn: Connection, tbls: JobReaperTables, now: datetime | None = None) -> set[str]:
    """Revoked ids that have not expired."""
    t = tbls.revoked
    return set(
        conn.execute(select(t.c.task_id).where(t.c.expires_at > (now or utcnow()))).scalars()
    )


def prune(conn: Connection, tbls: JobReaperTables, now: datetime | None = None) -> int:
    """Forget expired revoked ids; return how many."""
    t = tbls.revoked
    return int(conn.execute(delete(t).where(t.c.expires_at <= (now or utcnow()))).rowcount or 0)


class RevokedSync:
    """Copies this worker's in-memory revoked set to the table, from the heartbeat thread."""

    def __init__(self, db: Database, tbls: JobReaperTables, settings: Settings, node: str) -> None:
        self.db = db
        self.tables = tbls
        self.settings = settings
        self.node = node
        self._synced: set[str] = set()

    def sync(self) -> int:
        """Store revoked ids this worker learned since the last call; return how many."""
        # Settled jobs' ids are the table's already, and must not outlive their rows.
        new = [i for i in revoked_ids() - settled_ids() if i not in self._synced]
        if not new:
            return 0
        with self.db.connect() as conn, conn.begin():
            record(conn, self.tables, new, expires=self.settings.revoked_expires, node=self.node)
        self._synced.update(new)
        return len(new)


def revoke(
    app: Any,
    task_ids: str | Collection[str],
    *,
    terminate: bool = False,
    signal: str | None = None,
    expires: float | None = None,
) -> None:
    """Revoke tasks durably: stored for every future worker, then broadcast to live ones.

    Unlike ``app.control.revoke``, this works while no worker is online: the next worker
    to start removes the messages from its queues before consuming, and every worker skips
    them. *expires* (seconds) defaults to ``jobreaper_revoked_expires``.
    """
    ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    try:
        if settings.create_tables:
            from .schema import create_all

            create_all(db.engine, tables)
        with db.connect() as conn, conn.begin():
            record(conn, tables, ids, expires=expires or settings.revoked_expires, node=None)
    finally:
        db.dispose()
    kwargs: dict[str, Any] = {"terminate": terminate}
    if signal is not None:
        kwargs["signal"] = signal
    app.control.revoke(ids, **kwargs)
    logger.info("jobreaper: revoked %d task(s) durably", len(ids))
