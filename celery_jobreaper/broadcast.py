"""Remote-control broadcasts on a broker connection made in the calling thread."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def broadcast(
    app: Any,
    command: str,
    *,
    arguments: dict[str, Any] | None = None,
    destination: Collection[str] | None = None,
    reply: bool = False,
    timeout: float = 1.0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """``app.control.broadcast``, published and answered on a connection of this call.

    Celery's own publishes through the app's producer pool even when given a connection, and
    under gevent a pooled connection's socket waits on the hub of the thread that opened it:
    used from jobreaper's real threads (:mod:`celery_jobreaper.native`) it fails with "Cannot
    switch to a different thread". A connection made (and closed) here costs one connect; these
    calls are rare (suspects, a restore, a settle). Returns the replies (``[]`` without
    *reply*).
    """
    with app.connection_for_write() as conn:
        mailbox = app.control.mailbox(conn)  # a copy bound to *conn*
        mailbox._producer_pool = None  # publish on *conn*, not on a pooled connection
        replies = mailbox._broadcast(
            command,
            arguments or {},
            list(destination) if destination is not None else None,
            reply,
            timeout,
            limit,
        )
    return list(replies or [])
