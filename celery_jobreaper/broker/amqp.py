"""Remove exact messages from RabbitMQ queues (AMQP 0-9-1 has no delete-by-id).

The technique is get-and-hold: ``basic.get`` every ready message without acknowledging it
(it stays with the broker, invisible to other consumers), ``basic.ack`` the targets, then
hand the rest back with ``basic.recover(requeue=True)``. RabbitMQ puts a requeued message
back at its original position, so the queue order is kept (classic and quorum queues).

On a quorum queue every message handed back counts as a delivery (its ``x-delivery-count``
header goes up by one; RabbitMQ 3.x and 4.0-4.2 count every return, 4.3 only rejections),
and a message delivered more than the queue's ``delivery-limit`` is dead-lettered or dropped
(RabbitMQ 3.x has no default limit; 4.0 and later default to 20; a returned message whose
count then exceeds the limit is dead-lettered, 3.10 verified). So a sweep never hands a message
back with more than *max_deliveries* deliveries counted, and on a queue with a known
``delivery-limit`` (:func:`delivery_limits`) fewer than the limit: it stops at the first message
whose hand-back reaches that cap (that one is handed back too), and leaves a *hold* on
the queue: the next sweeps leave the queue alone until every message it held then has left it
(the queue's ready count has dropped by that many). A sweep stopped by its own bounds leaves
a hold until the messages it took have left, so it does not take the same first messages
again and again. Holds are plain values for the caller to keep between sweeps. (RabbitMQ
3.x quorum queues take a returned message back at their tail, 3.10 verified: a sweep that
goes through the whole queue keeps its order, one that stops early does not.)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import amqp
import amqp.spec

from .messages import task_id_of
from .result import SweepResult

if TYPE_CHECKING:
    import kombu

__all__ = ["Hold", "delivery_limits", "sweep_queues"]

logger = logging.getLogger(__name__)


#: How the sweep of one queue ended.
DONE, HELD, STOPPED = "done", "held", "stopped"


@dataclasses.dataclass(frozen=True)
class Hold:
    """A queue left alone until *ahead* + 1 messages left it (it had *ready* ready then)."""

    ready: int
    ahead: int


def _ready(channel: Any, queue: str) -> int | None:
    """The queue's ready message count (a passive declare: nothing is taken)."""
    try:
        ok = channel.queue_declare(queue=queue, passive=True)
    except Exception:
        return None
    return int(ok.message_count)


#: RabbitMQ 4.0 and later give quorum queues this ``delivery-limit`` unless one is set.
RABBITMQ4_DEFAULT_DELIVERY_LIMIT = 20


def delivery_limits(conn: kombu.Connection, declared: Mapping[str, Any]) -> dict[str, int]:
    """The ``delivery-limit`` of each of *declared* (queue name -> :class:`kombu.Queue`).

    Read from the queue's own ``x-delivery-limit`` argument; on RabbitMQ 4.0 and later a queue
    without one is taken to have the default 20 (a quorum queue may be declared without
    arguments where it is the virtual host's default queue type). A limit set by a *policy*
    cannot be read over AMQP (only through the management API): ``jobreaper_amqp_max_deliveries``
    must stay below it. A negative limit (RabbitMQ 4: no limit) is no limit.
    """
    properties = getattr(conn.connection, "server_properties", None) or {}
    version = properties.get("version", b"")
    version = version.decode() if isinstance(version, bytes) else str(version)
    try:
        major = int(version.split(".", 1)[0])
    except ValueError:
        major = 4  # unknown: assume the stricter default
    limits: dict[str, int] = {}
    for name, queue in declared.items():
        arguments = getattr(queue, "queue_arguments", None) or {}
        value = arguments.get("x-delivery-limit")
        try:
            limit = int(value) if value is not None else None
        except (TypeError, ValueError):
            limit = None
        if limit is None and major >= 4:
            limit = RABBITMQ4_DEFAULT_DELIVERY_LIMIT
        if limit is not None and limit >= 0:
            limits[name] = limit
    return limits


def _cap(max_deliveries: int | None, limit: int | None) -> int | None:
    """The most deliveries a sweep may leave counted on a message it hands back."""
    caps = [c for c in (max_deliveries, None if limit is None else limit - 1) if c is not None]
    return min(caps) if caps else None


def _delivery_count(message: Any) -> int:
    headers = message.headers if isinstance(message.headers, dict) else {}
    try:
        return int(headers.get("x-delivery-count") or 0)
    except (TypeError, ValueError):
        return 0


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
    max_deliveries: int | None = None,
    limits: Mapping[str, int] | None = None,
    holds: MutableMapping[str, Hold] | None = None,
    dry_run: bool = False,
) -> SweepResult:
    """Remove the ready messages of *queues* whose task id satisfies *should_remove*.

    Each queue is drained with ``basic.get`` (no auto-ack) on a channel of its own; targets
    are acked (deleted) as they are found, every other message, unparsable ones included,
    is held and given back when the queue is done, in its original order. At most
    *max_messages* messages are taken and *max_seconds* spent over the whole call: when a
    bound is hit the sweep stops, gives back everything it holds (targets already acked
    stay removed), marks the result ``partial`` and logs it. *dry_run* acks nothing.

    With *max_deliveries* or a queue's delivery limit in *limits* (queue -> limit, see
    :func:`delivery_limits`), a queue's sweep also stops (``partial``) at the first message
    that is not a target and whose ``x-delivery-count`` would reach the cap when handed back
    (*max_deliveries*, and below the limit); with a cap under one it leaves the queue
    alone. With *holds* (queue ->
    :class:`Hold`), a queue held is left alone until the message its last sweep stopped at
    has left it, and a sweep that stops leaves a hold there (see the module's docstring).

    Limits:

    * only *ready* messages are seen: messages prefetched by live consumers (delivered,
      not yet acked) are invisible and untouched; they come back only if that consumer
      dies, so sweep again later or before workers start;
    * while held, messages are invisible to consumers (for at most *max_seconds*): a live
      consumer of the queue takes the messages behind them first, so they run later than
      their order (with no other consumer the order is kept; see the module docstring);
    * every message given back is marked redelivered, and on quorum queues a requeue may
      count towards the queue's ``delivery-limit`` (a message requeued that many times is
      dead-lettered or dropped): see *max_deliveries* and *holds*; a dry run gives
      messages back too (so ``celery jobreaper plan`` does not call this).
    """
    result = SweepResult()
    deadline = time.monotonic() + max_seconds
    budget = max_messages
    for queue in queues:
        if budget <= 0 or time.monotonic() >= deadline:
            result.partial = True
            break
        taken, status = _sweep_queue(
            conn,
            queue,
            should_remove,
            budget=budget,
            deadline=deadline,
            max_deliveries=_cap(max_deliveries, (limits or {}).get(queue)),
            holds=holds,
            dry_run=dry_run,
            result=result,
        )
        budget -= taken
        if status != DONE:
            result.partial = True
        if status == STOPPED:
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
    max_deliveries: int | None,
    holds: MutableMapping[str, Hold] | None,
    dry_run: bool,
    result: SweepResult,
) -> tuple[int, str]:
    """Sweep one queue; return (messages taken, DONE, HELD or STOPPED by the bounds)."""
    channel: Any = conn.channel()
    taken = 0
    complete = False
    held = 0
    unparsable = 0
    worn: str | None = None
    removed_here = 0
    try:
        if max_deliveries is not None and max_deliveries < 1:
            logger.warning(
                "jobreaper: AMQP queue %r: its delivery limit leaves no hand-back to spare; "
                "left alone",
                queue,
            )
            return 0, HELD
        ready_before = _ready(channel, queue) if holds is not None else None
        if holds is not None and queue in holds:
            hold = holds[queue]
            if ready_before is None or hold.ready - ready_before <= hold.ahead:
                logger.debug("jobreaper: AMQP queue %r is held (%s); left alone", queue, hold)
                return 0, HELD
            del holds[queue]
        while True:
            if taken >= budget or time.monotonic() >= deadline:
                break
            try:
                raw = channel.basic_get(queue=queue, no_ack=False)
            except conn.channel_errors as error:  # e.g. 404: no such queue
                logger.warning("jobreaper: cannot read AMQP queue %r: %s", queue, error)
                return taken, DONE
            if raw is None:
                complete = True
                break
            taken += 1
            result.scanned += 1
            message = channel.message_to_python(raw)
            task_id = _task_id(message)
            if task_id is not None and should_remove(task_id):
                result.removed.append((task_id, queue))
                if dry_run:
                    held += 1
                else:
                    channel.basic_ack(message.delivery_tag)
                    removed_here += 1
                continue
            held += 1
            if task_id is None:
                unparsable += 1
            if max_deliveries is not None and _delivery_count(message) + 1 >= max_deliveries:
                worn = task_id or "(unreadable)"
                break
        if held:
            _give_back(channel)
        if holds is not None and ready_before is not None and (worn is not None or not complete):
            # Counted from the ready count before the sweep (a quorum queue takes messages
            # back asynchronously). Stopped by its bounds: the messages it took are the
            # first ``held`` (classic queues; RabbitMQ 3.x quorum queues take them back at
            # the tail): leave the queue until that many have left it. Stopped at a worn
            # message, which may have gone back to the head or to the tail: until every
            # message there was has left it.
            there = ready_before - removed_here
            ahead = there - 1 if worn is not None else held - 1
            holds[queue] = Hold(there, max(ahead, 0))
    finally:
        try:
            channel.close()  # requeues anything still unacked (e.g. after an error)
        except conn.connection_errors + conn.channel_errors:
            logger.debug("jobreaper: closing the AMQP sweep channel failed", exc_info=True)
    if worn is not None:
        logger.warning(
            "jobreaper: AMQP queue %r: message of task %s has %d or more deliveries counted "
            "now; the sweep stopped there and leaves the queue alone until it is consumed",
            queue,
            worn,
            max_deliveries,
        )
        return taken, HELD
    if unparsable:
        result.unparsable += unparsable
        logger.warning(
            "jobreaper: %d message(s) in AMQP queue %r are not task messages we can read; "
            "given back untouched",
            unparsable,
            queue,
        )
    return taken, DONE if complete else STOPPED
