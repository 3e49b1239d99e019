"""Who holds kombu's Redis ``unacked`` entries: every worker on the broker answers, or nobody knows.

kombu's ``unacked`` hash does not say which consumer took an entry, and Celery's
``query_task`` does not see every request a worker holds: a rate-limited request waits in the
consumer's token bucket, outside ``worker_state.requests`` (and an ETA request is there only
from Celery 5.7 on). What does know is the consumer's channel: kombu's virtual ``QoS`` keeps
every message delivered and not yet acknowledged, by delivery tag, which is the field name
of the ``unacked`` entry. So a worker answers :data:`HELD_COMMAND` with the delivery tags it
holds (plus the task ids among its requests and token buckets).

Nothing may be restored unless *every* worker on the broker answered. The number of workers
is read from the broker itself, not from jobreaper's tables: every Celery worker listens to
the ``celery.pidbox`` broadcast through a Redis pub/sub subscription that lives exactly as
long as its connection, and ``PUBLISH`` returns how many subscribers received a message. An
empty message is ignored by kombu's receiver, so publishing one counts the workers without
telling them anything. The count is taken before and after the ask; the answer is trusted
only if both counts agree, that many workers answered, each answer is complete (a worker
without the command, or whose channel cannot be read, answers with an error or incomplete),
and every worker jobreaper knows to be live (fresh heartbeat) is among them. Otherwise the
answer is "don't know" (``None``) and the caller restores nothing that time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable
from typing import Any

from .. import workerstate
from ..broadcast import broadcast

logger = logging.getLogger(__name__)

#: The remote-control command a jobreaper worker answers (see :mod:`celery_jobreaper.control`).
HELD_COMMAND = "jobreaper_held"


def held_here(consumer: Any, tags: Iterable[str], ids: Iterable[str]) -> dict[str, Any]:
    """This worker's answer: which of *tags* and *ids* it holds, and whether it could tell.

    Runs in the worker (the consumer's thread, through the remote-control command). Task
    ids are looked for among its requests, its rate-limit token buckets and its timer (ETA
    requests, which Celery before 5.7 keeps only there); asked about task ids only (no
    tags), it need not read its channel, so it can answer on any transport.
    """
    from celery.worker import state as worker_state

    asked = set(tags)
    delivered = _delivered_tags(consumer) if asked else set()
    if delivered is None:
        return {"complete": False}
    wanted = set(ids)
    held_ids = {i for i in workerstate.snapshot(worker_state.requests) if i in wanted}
    held_ids |= {i for i in _bucket_ids(consumer) if i in wanted}
    held_ids |= {i for i in workerstate.timer_request_ids(consumer) if i in wanted}
    return {
        "complete": True,
        "tags": sorted(tag for tag in asked if tag in delivered),
        "ids": sorted(held_ids),
    }


def _delivered_tags(consumer: Any) -> set[str] | None:
    """Delivery tags the task consumer's channel holds unacknowledged; None if unreadable."""
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return set()  # not consuming (yet): it holds nothing
    qos = getattr(getattr(task_consumer, "channel", None), "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if delivered is None:
        return None
    return {str(tag) for tag in workerstate.snapshot(delivered)}


def _bucket_ids(consumer: Any) -> set[str]:
    """Task ids of requests waiting in the consumer's rate-limit token buckets."""
    found: set[str] = set()
    buckets = getattr(consumer, "task_buckets", None) or {}
    for bucket in list(buckets.values()):
        for item in workerstate.snapshot(getattr(bucket, "contents", ())):
            request = item[0] if isinstance(item, tuple) else item
            task_id = getattr(request, "id", None)
            if isinstance(task_id, str):
                found.add(task_id)
    return found


@dataclasses.dataclass(frozen=True)
class Holdings:
    """What the workers on the broker hold, from complete answers of all of them."""

    tags: frozenset[str]
    ids: frozenset[str]
    workers: int


def pidbox_listeners(app: Any, conn: Any, client: Any, prefix: str) -> int:
    """How many workers listen to the remote-control broadcast on this Redis broker now.

    *client* is a plain client (the kombu channel's own may have a BRPOP in flight);
    *prefix* is the ``global_keyprefix`` kombu puts before the topic.
    """
    channel = conn.default_channel
    exchange = app.control.mailbox.exchange.name
    topics_of = getattr(channel, "_get_publish_topics", None)
    topics = topics_of(exchange, "") if topics_of else [channel._get_publish_topic(exchange, "")]
    # kombu's receiver ignores a message without data; PUBLISH returns its receivers.
    return sum(int(client.publish(prefix + topic, "")) for topic in topics)


def ask_holders(
    app: Any,
    conn: Any,
    client: Any,
    prefix: str,
    *,
    tags: Collection[str],
    ids: Collection[str],
    timeout: float,
    known_live: Collection[str],
) -> Holdings | None:
    """Ask every worker on the broker which of *tags*/*ids* it holds; None: don't know.

    *conn* is a kombu connection to the broker, *client* a plain Redis client on it and
    *prefix* its ``global_keyprefix``.
    """
    before = pidbox_listeners(app, conn, client, prefix)
    replies: list[dict[str, Any]] = []
    if before:
        replies = broadcast(
            app,
            HELD_COMMAND,
            arguments={"tags": sorted(tags), "ids": sorted(ids)},
            reply=True,
            timeout=timeout,
            limit=before,
        )
    after = pidbox_listeners(app, conn, client, prefix)
    answered: set[str] = set()
    incomplete: set[str] = set()
    held_tags: set[str] = set()
    held_ids: set[str] = set()
    count = 0
    for reply in replies:
        for node, body in (reply or {}).items():
            count += 1
            if not (isinstance(body, dict) and body.get("complete") is True):
                incomplete.add(node)
                continue
            answered.add(node)
            held_tags.update(str(t) for t in body.get("tags") or ())
            held_ids.update(str(i) for i in body.get("ids") or ())
    why = None
    if before != after:
        why = f"the number of workers on the broker changed while asking ({before} -> {after})"
    elif count < before:
        why = f"{before - count} of {before} worker(s) on the broker did not answer"
    elif incomplete:
        why = f"worker(s) {', '.join(sorted(incomplete))} could not tell (no jobreaper command?)"
    elif missing := set(known_live) - answered:
        why = f"live worker(s) {', '.join(sorted(missing))} did not answer"
    if why is not None:
        logger.info("jobreaper: %s; unacked messages are left for the next sweep", why)
        return None
    return Holdings(frozenset(held_tags), frozenset(held_ids), count)
