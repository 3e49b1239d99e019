"""Remove exact messages from RabbitMQ queues (AMQP 0-9-1 has no delete-by-id).

The technique is get-and-hold: ``basic.get`` every ready message without acknowledging it
(it stays with the broker, invisible to other consumers), ``basic.ack`` the targets, then
hand the rest back with ``basic.recover(requeue=True)``. RabbitMQ puts a requeued message
back at its original position, so the queue order is kept (classic and quorum queues).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import amqp
import amqp.spec

from .messages import task_id_of
from .result import SweepResult

if TYPE_CHECKING:
    import kombu

__all__ = ["sweep_queues"]

logger = logging.getLogger(__name__)


def _give_back(channel: Any) -> None:
    """Requeue every unacked message of *channel*, keeping their queue positions.

    ``basic.recover(requeue=True)`` keeps the order on classic and quorum queues; closing
    the channel instead scrambles it on quorum queues (RabbitMQ 3.10, verified). py-amqp
    does not wait for ``recover-ok``, so wait for it here (else it is logged as unexpected
    when the channel closes).
    """
    channel.basic_recover(requeue=True)
    if isinstance(channel, amqp.Channel):
        channel.wait(amqp.spec.Basic.RecoverOk)


def _task_id(message: Any) -> str | None:
    """Task id of a kombu AMQP message (headers, then a protocol 1 body, then correlation)."""
    properties = message.properties if isinstance(message.properties, dict) else {}
    return task_id_of(
        {
            "headers": message.headers if isinstance(message.headers, dict) else {},
            "properties": properties,
            "body": message.body,
            "content-type": message.content_type,
            "content-encoding": message.content_encoding,
        }
    )


def sweep_queues(
    conn: kombu.Connection,
    queues: Sequence[str],
    should_remove: Callable[[str], bool],
    *,
    max_messages: int = 100_000,
    max_seconds: float = 30.0,
    dry_run: bool = False,
) -> SweepResult:
    """Remove the ready messages of *queues* whose task id satisfies *should_remove*.

    Each queue is drained with ``basic.get`` (no auto-ack) on a channel of its own; targets
    are acked (deleted) as they are found, every other message, unparsable ones included,
    is held and given back when the queue is done, in its original order. At most
    *max_messages* messages are taken and *max_seconds* spent over the whole call: when a
    bound is hit the sweep stops, gives back everything it holds (targets already acked
    stay removed), marks the result ``partial`` and logs it. *dry_run* acks nothing.

    Limits:

    * only *ready* messages are seen: messages prefetched by live consumers (delivered,
      not yet acked) are invisible and untouched; they come back only if that consumer
      dies, so sweep again later or before workers start;
    * while held, messages are invisible to consumers (for at most *max_seconds*);
    * every message given back is marked redelivered, and on quorum queues a requeue may
      count towards the queue's ``delivery-limit`` (a message requeued that many times is
      dead-lettered or dropped), so do not sweep the same quorum queue in a tight loop;
      a dry run gives messages back too.
    """
    result = SweepResult()
    deadline = time.monotonic() + max_seconds
    budget = max_messages
    for queue in queues:
        if budget <= 0 or time.monotonic() >= deadline:
            result.partial = True
            break
        taken, complete = _sweep_queue(
            conn,
            queue,
            should_remove,
            budget=budget,
            deadline=deadline,
            dry_run=dry_run,
            result=result,
        )
        budget -= taken
        if not complete:
            result.partial = True
            break
    if result.partial:
        logger.warning(
            "jobreaper: AMQP sweep stopped early (max_messages=%d, max_seconds=%s); "
            "%d message(s) examined, everything not removed was given back",
            max_messages,
            max_seconds,
            result.scanned,
        )
    if result.removed:
        logger.info(
            "jobreaper: %s %d message(s) from %s",
            "would remove" if dry_run else "removed",
            len(result.removed),
            ", ".join(sorted(set(queues))),
        )
    return result


def _sweep_queue(
    conn: kombu.Connection,
    queue: str,
    should_remove: Callable[[str], bool],
    *,
    budget: int,
    deadline: float,
    dry_run: bool,
    result: SweepResult,
) -> tuple[int, bool]:
    """Sweep one queue; return (messages taken, whether the queue was emptied)."""
    channel: Any = conn.channel()
    taken = 0
    complete = False
    held = 0
    unparsable = 0
    try:
        while True:
            if taken >= budget or time.monotonic() >= deadline:
                break
            try:
                raw = channel.basic_get(queue=queue, no_ack=False)
            except conn.channel_errors as error:  # e.g. 404: no such queue
                logger.warning("jobreaper: cannot read AMQP queue %r: %s", queue, error)
                return taken, True
            if raw is None:
                complete = True
                break
            taken += 1
            result.scanned += 1
            message = channel.message_to_python(raw)
            task_id = _task_id(message)
            if task_id is None:
                unparsable += 1
                held += 1
            elif should_remove(task_id):
                result.removed.append((task_id, queue))
                if dry_run:
                    held += 1
                else:
                    channel.basic_ack(message.delivery_tag)
            else:
                held += 1
        if held:
            _give_back(channel)
    finally:
        try:
            channel.close()  # requeues anything still unacked (e.g. after an error)
        except conn.connection_errors + conn.channel_errors:
            logger.debug("jobreaper: closing the AMQP sweep channel failed", exc_info=True)
    if unparsable:
        result.unparsable += unparsable
        logger.warning(
            "jobreaper: %d message(s) in AMQP queue %r are not task messages we can read; "
            "given back untouched",
            unparsable,
            queue,
        )
    return taken, complete
