"""Asking workers whether they are alive: ``jobreaper_ping``, one broadcast, every reply kept."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from .broadcast import broadcast
from .incarnation import Incarnation

#: The remote-control command a jobreaper worker answers with its incarnation id.
PING_COMMAND = "jobreaper_ping"

#: ``ping(nodes, timeout)`` -> the node names that replied (never counting a reply of this very
#: process); ``nodes=None`` asks every worker on the broker; raises if the broker is unreachable.
Pinger = Callable[[Collection[str] | None, float], set[str]]


#: A reply limit no broadcast reaches: kombu collects replies until none came for the timeout
#: (its default, ``None``, means "as many as there are destinations").
ALL_REPLIES = 10_000


def ping_with(app: Any, me: Incarnation | None = None) -> Pinger:
    """A :data:`Pinger` asking exactly the named nodes once, with ``jobreaper_ping``.

    Each jobreaper worker answers with its incarnation id, so the reply of this very process
    (its own consumer answers to its node name) is never taken for another live process: it
    is left out. A worker without jobreaper answers with an error, which still counts as a
    reply. Replies are collected until none came for *timeout* seconds (:data:`ALL_REPLIES`):
    kombu otherwise stops at as many replies as there are destinations, and two processes
    answering to one name (or any extra reply) would take a place and drop the reply of a
    live suspect. Suspects are pinged only when a heartbeat went quiet, so this wait is rare.
    ``nodes=None`` asks every worker on the broker (one broadcast, same wait).
    """

    def ping(nodes: Collection[str] | None, timeout: float) -> set[str]:
        if nodes is not None and not nodes:
            return set()
        replies = broadcast(
            app,
            PING_COMMAND,
            destination=nodes,
            reply=True,
            timeout=timeout,
            limit=ALL_REPLIES,
        )
        return {
            name
            for reply in replies
            for name, body in reply.items()
            if not (me is not None and name == me.node and _incarnation_of(body) == me.id)
        }

    return ping


def _incarnation_of(body: Any) -> str | None:
    return body.get("incarnation") if isinstance(body, dict) else None
