"""Settle kombu's ``unacked`` entries of dead workers: drop or restore them now.

A message a consumer took but has not acknowledged sits in the ``unacked`` hash (field =
delivery tag, value = JSON ``[message, exchange, routing_key]``) with its delivery time in the
``unacked_index`` sorted set.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import redis
from kombu.transport.redis import Mutex, MutexHeld
from kombu.utils.json import dumps, loads

from ..messages import task_id_of
from ..result import SweepResult
from .keys import (
    BINDING_PREFIX,
    DEFAULT_PRIORITY,
    DEFAULT_PRIORITY_STEPS,
    DEFAULT_SEP,
    MAX_PRIORITY,
    MIN_PRIORITY,
    check_client,
    list_key,
    priority_step,
    text,
)

logger = logging.getLogger(__name__)

#: How often one ``unacked`` entry is retried when its WATCHed keys keep changing.
WATCH_RETRIES = 50


def _message_priority(payload: Any) -> int:
    """kombu's ``Channel._get_message_priority`` (not reversed)."""
    try:
        return max(min(int(payload["properties"]["priority"]), MAX_PRIORITY), MIN_PRIORITY)
    except (TypeError, ValueError, KeyError):
        return DEFAULT_PRIORITY


def _bound_queues(members: Iterable[bytes | str], sep: str, routing_key: str) -> list[str]:
    """Queues of a ``_kombu.binding.<exchange>`` set that *routing_key* reaches.

    Members are ``routing_key<sep>pattern<sep>queue``; topic bindings carry a regex pattern
    (kombu's ``TopicExchange``), direct ones an empty pattern and match the key exactly.
    """
    queues: set[str] = set()
    for member in members:
        parts = text(member).split(sep)
        if len(parts) != 3 or not parts[2]:
            continue
        bound_key, pattern, queue = parts
        if pattern:
            try:
                hit = re.match(pattern, routing_key) is not None
            except re.error:
                hit = False
        else:
            hit = bound_key == routing_key
        if hit:
            queues.add(queue)
    return sorted(queues)


def _parse_unacked(raw: bytes | str) -> tuple[dict[str, Any], str, str] | None:
    try:
        entry = loads(text(raw))
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(entry, list) or len(entry) != 3:
        return None
    payload, exchange, routing_key = entry
    if not isinstance(payload, dict):
        return None
    if exchange is None:
        exchange = ""
    if routing_key is None:
        routing_key = ""
    if not isinstance(exchange, str) or not isinstance(routing_key, str):
        return None
    return payload, exchange, routing_key


def _redelivered(payload: dict[str, Any]) -> str:
    """kombu's ``_do_restore_message``: mark as redelivered and dump."""
    try:
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
    except (KeyError, TypeError):
        pass
    text: str = dumps(payload)
    return text


@dataclasses.dataclass(frozen=True)
class UnackedEntry:
    """One ``unacked`` entry as read once: delivery tag, exact stored value, delivery time."""

    tag: str
    raw: bytes
    score: float
    task_id: str | None


#: Entries read per HMGET (a bounded command however large the hash is).
READ_CHUNK = 1_000


def read_unacked(
    client: redis.Redis[Any],
    *,
    ceiling: float,
    unacked_key: str = "unacked",
    unacked_index_key: str = "unacked_index",
    global_keyprefix: str = "",
) -> list[UnackedEntry]:
    """The ``unacked`` entries delivered at or before *ceiling* (a UNIX time): one snapshot.

    Whatever is decided about these entries is decided about exactly these values: the
    settling step (:func:`settle_unacked`) acts on an entry only while its tag still holds the
    same bytes with the same delivery time.
    """
    check_client(client)
    index = cast(Any, client).zrange(
        global_keyprefix + unacked_index_key, "-inf", ceiling, byscore=True, withscores=True
    )
    entries: list[UnackedEntry] = []
    for start in range(0, len(index), READ_CHUNK):
        part = index[start : start + READ_CHUNK]
        values = client.hmget(global_keyprefix + unacked_key, [tag for tag, _ in part])
        for (tag, score), raw in zip(part, values, strict=True):
            if raw is None:
                continue  # acknowledged between the two reads
            parsed = _parse_unacked(raw)
            task_id = task_id_of(parsed[0]) if parsed else None
            entries.append(UnackedEntry(text(tag), bytes(raw), float(score), task_id))
    return entries


class _Settler:
    def __init__(
        self,
        client: redis.Redis[Any],
        *,
        is_held: Callable[[UnackedEntry], bool],
        should_drop: Callable[[str], bool],
        unacked_key: str,
        index_key: str,
        priority_steps: Sequence[int],
        sep: str,
        prefix: str,
        dry_run: bool,
    ) -> None:
        self.client = client
        self.is_held = is_held
        self.should_drop = should_drop
        self.unacked_key = unacked_key
        self.index_key = index_key
        self.priority_steps = priority_steps
        self.sep = sep
        self.prefix = prefix
        self.dry_run = dry_run
        self.result = SweepResult()

    def run(self, entries: Sequence[UnackedEntry]) -> SweepResult:
        for entry in entries:
            self.result.scanned += 1
            self._settle(entry)
        return self.result

    def _settle(self, entry: UnackedEntry) -> None:
        if entry.task_id is None:
            self.result.unparsable += 1
            logger.warning(
                "jobreaper: unacked entry %s in %r is not a task message we can read; "
                "left as it is",
                entry.tag,
                self.unacked_key,
            )
            return
        if self.is_held(entry):
            return
        for _ in range(WATCH_RETRIES):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    self._settle_once(pipe, entry, entry.task_id)
                    return
                except redis.WatchError:
                    continue
        logger.warning(
            "jobreaper: unacked entry %s kept changing under the sweep; left as it is", entry.tag
        )

    def _settle_once(self, pipe: Any, entry: UnackedEntry, task_id: str) -> None:
        """One WATCH/MULTI attempt for *entry*; raises WatchError if raced."""
        tag = entry.tag
        pipe.watch(self.unacked_key, self.index_key)
        score = pipe.zscore(self.index_key, tag)
        raw = pipe.hget(self.unacked_key, tag)
        if score is None or raw is None or float(score) != entry.score or bytes(raw) != entry.raw:
            return  # acknowledged, restored or changed since the snapshot: not what was judged
        parsed = _parse_unacked(raw)
        assert parsed is not None  # the same bytes parsed when read
        payload, exchange, routing_key = parsed
        if self.should_drop(task_id):
            if not self.dry_run:
                pipe.multi()
                pipe.zrem(self.index_key, tag)
                pipe.hdel(self.unacked_key, tag)
                pipe.execute()
            self.result.dropped_unacked.append((task_id, tag))
            return
        if exchange:
            members = pipe.smembers(f"{self.prefix}{BINDING_PREFIX}{exchange}")
            queues = _bound_queues(members, self.sep, routing_key)
        else:
            queues = [routing_key] if routing_key else []
        if not queues:
            # kombu would drop it (no queue to restore to); keep it for a human.
            self.result.unparsable += 1
            logger.warning(
                "jobreaper: no queue is bound to exchange %r with routing key %r for unacked "
                "task %s; left as it is",
                exchange,
                routing_key,
                task_id,
            )
            return
        step = priority_step(_message_priority(payload), self.priority_steps)
        keys = [list_key(queue, step, self.sep, self.prefix) for queue in queues]
        body = _redelivered(payload)
        if not self.dry_run:
            pipe.multi()
            pipe.zrem(self.index_key, tag)
            pipe.hdel(self.unacked_key, tag)
            for key in keys:
                pipe.rpush(key, body)
            pipe.execute()
        self.result.restored.extend((task_id, key) for key in keys)


def settle_unacked(
    client: redis.Redis[Any],
    entries: Sequence[UnackedEntry],
    *,
    is_held: Callable[[UnackedEntry], bool],
    should_drop: Callable[[str], bool],
    unacked_key: str = "unacked",
    unacked_index_key: str = "unacked_index",
    unacked_mutex_key: str = "unacked_mutex",
    unacked_mutex_expire: int = 300,
    priority_steps: Sequence[int] = DEFAULT_PRIORITY_STEPS,
    sep: str = DEFAULT_SEP,
    global_keyprefix: str = "",
    dry_run: bool = False,
) -> SweepResult:
    """Drop or restore the snapshot *entries* that no live worker holds.

    An entry for which ``is_held(entry)`` is false is dropped (HDEL + ZREM) when
    ``should_drop(task_id)``, otherwise put back on its queue at once the way kombu's
    ``restore_by_tag`` does: redelivered flags set, RPUSHed (consumed next) to the priority
    list of every queue its exchange and routing key reach through the
    ``_kombu.binding.<exchange>`` sets. Each entry is settled in its own WATCH/MULTI
    transaction, and only while its tag still holds exactly the bytes and the delivery time
    read in the snapshot; all of it under kombu's ``unacked_mutex`` taken without waiting: if
    another party holds it, nothing is done and an empty result is returned. Unreadable
    entries, and entries no queue is bound for (kombu would lose those), are left as they are
    and counted in ``unparsable``. *dry_run* only reads (no mutex).
    """
    check_client(client)
    settler = _Settler(
        client,
        is_held=is_held,
        should_drop=should_drop,
        unacked_key=global_keyprefix + unacked_key,
        index_key=global_keyprefix + unacked_index_key,
        priority_steps=priority_steps,
        sep=sep,
        prefix=global_keyprefix,
        dry_run=dry_run,
    )
    if dry_run:
        result = settler.run(entries)
    else:
        try:
            with Mutex(client, global_keyprefix + unacked_mutex_key, unacked_mutex_expire):
                result = settler.run(entries)
        except MutexHeld:
            logger.debug(
                "jobreaper: %r is held by another party; unacked sweep skipped",
                global_keyprefix + unacked_mutex_key,
            )
            return SweepResult()
    if result.dropped_unacked or result.restored:
        logger.info(
            "jobreaper: %s %d and %s %d unacked message(s)",
            "would drop" if dry_run else "dropped",
            len(result.dropped_unacked),
            "would restore" if dry_run else "restored",
            len(result.restored),
        )
    return result


def sweep_unacked(
    client: redis.Redis[Any],
    *,
    is_live: Callable[[str], bool],
    should_drop: Callable[[str], bool],
    grace: float,
    now: float | None = None,
    unacked_key: str = "unacked",
    unacked_index_key: str = "unacked_index",
    unacked_mutex_key: str = "unacked_mutex",
    unacked_mutex_expire: int = 300,
    priority_steps: Sequence[int] = DEFAULT_PRIORITY_STEPS,
    sep: str = DEFAULT_SEP,
    global_keyprefix: str = "",
    dry_run: bool = False,
) -> SweepResult:
    """:func:`read_unacked` (delivered ``grace`` seconds before *now*), then
    :func:`settle_unacked` of the entries whose task id is not ``is_live(task_id)``.

    For callers that already know which task ids are live; the broker sweep reads the
    snapshot first and asks the workers about exactly its entries.
    """
    now = time.time() if now is None else now
    entries = read_unacked(
        client,
        ceiling=now - grace,
        unacked_key=unacked_key,
        unacked_index_key=unacked_index_key,
        global_keyprefix=global_keyprefix,
    )
    return settle_unacked(
        client,
        entries,
        is_held=lambda entry: entry.task_id is not None and is_live(entry.task_id),
        should_drop=should_drop,
        unacked_key=unacked_key,
        unacked_index_key=unacked_index_key,
        unacked_mutex_key=unacked_mutex_key,
        unacked_mutex_expire=unacked_mutex_expire,
        priority_steps=priority_steps,
        sep=sep,
        global_keyprefix=global_keyprefix,
        dry_run=dry_run,
    )
