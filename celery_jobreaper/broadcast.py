"""Remote-control broadcasts on a pooled broker connection that the calling thread may use."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from . import native

#: Under gevent: per OS thread, ``id(app) -> (app, its broker connection pool for the thread)``.
_pools = native.thread_local()


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
    """``app.control.broadcast``, published and answered on one connection of this thread.

    Celery's own publishes through the app's producer pool even when given a connection, and
    under gevent a pooled connection's socket waits on the hub of the thread that opened it:
    used from jobreaper's real threads (:mod:`celery_jobreaper.native`) it fails with "Cannot
    switch to a different thread". So the message goes out on the connection the replies come
    back on, taken from :func:`_connection`. Returns the replies (``[]`` without *reply*).
    """
    with _connection(app) as conn:
        mailbox = app.control.mailbox(conn)  # a copy bound to *conn*
        mailbox._producer_pool = None  # publish on *conn*, not on the app's producer pool
        replies = mailbox._broadcast(
            command,
            arguments or {},
            list(destination) if destination is not None else None,
            reply,
            timeout,
            limit,
        )
    return list(replies or [])


def reply(app: Any, reply_to: dict[str, str], ticket: str, body: dict[str, Any]) -> None:
    """Publish *body* as a remote-control reply to *reply_to* under *ticket* (as a worker
    answers a command), on a connection the calling thread may use."""
    with _connection(app) as conn:
        mailbox = app.control.mailbox(conn)
        mailbox._producer_pool = None  # on *conn*: see :func:`broadcast`
        mailbox._publish_reply(body, reply_to["exchange"], reply_to["routing_key"], ticket)


def _connection(app: Any) -> Any:
    """A pooled broker connection the calling thread may use (a context manager): from the
    app's own pool (shared by threads, as Celery uses it), or under gevent from a pool of this
    OS thread's own, kept while the thread lives.

    A connection is kept, not made and closed per call: closing a Redis connection waits for
    the reply consumer's ``BRPOP`` in flight (up to a second).
    """
    if not native.patched():
        return app.connection_or_acquire()
    pools: dict[int, tuple[Any, Any]] | None = getattr(_pools, "pools", None)
    if pools is None:
        pools = _pools.pools = {}
    made = pools.get(id(app))
    if made is None or made[0] is not app:
        limit = app.conf.broker_pool_limit or 1
        made = pools[id(app)] = (app, app.connection_for_write().Pool(limit=limit))
    return made[1].acquire(block=True)
