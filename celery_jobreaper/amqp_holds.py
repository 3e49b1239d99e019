"""Where RabbitMQ sweeps stopped (:class:`~celery_jobreaper.broker.amqp.Hold`), kept in SQL.

A hold must outlive the process that made it: every worker start and every ``reap()`` call
sweeps afresh, and each sweep of a quorum queue counts one delivery for every message it
takes. The holds live in ``jobreaper_meta`` under ``amqp_hold:<sha1 of the queue name>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from .schema import JobReaperTables

if TYPE_CHECKING:
    from .broker.amqp import Hold

PREFIX = "amqp_hold:"


def _key(queue: str) -> str:
    return PREFIX + hashlib.sha1(queue.encode("utf-8")).hexdigest()


def load(conn: Connection, tbls: JobReaperTables, queues: Iterable[str]) -> dict[str, Hold]:
    """The holds stored for *queues*."""
    from .broker.amqp import Hold

    keys = {_key(queue): queue for queue in queues}
    if not keys:
        return {}
    meta = tbls.meta
    holds: dict[str, Hold] = {}
    for key, value in conn.execute(
        select(meta.c.key, meta.c.value).where(meta.c.key.in_(list(keys)))
    ):
        try:
            ready, ahead = (int(part) for part in value.split())
        except ValueError:
            continue
        holds[keys[key]] = Hold(ready, ahead)
    return holds


def save(
    conn: Connection, tbls: JobReaperTables, queues: Iterable[str], holds: Mapping[str, Hold]
) -> None:
    """Store the holds of *queues* (and forget those of *queues* no longer held)."""
    keys = {_key(queue): queue for queue in queues}
    if not keys:
        return
    meta = tbls.meta
    conn.execute(delete(meta).where(meta.c.key.in_(list(keys))))
    rows = [
        {"key": key, "value": f"{holds[queue].ready} {holds[queue].ahead}"}
        for key, queue in keys.items()
        if queue in holds
    ]
    if rows:
        conn.execute(insert(meta), rows)
