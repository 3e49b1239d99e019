"""Remove exact messages from kombu's Redis transport: queue lists and the ``unacked`` hash.

Layout (kombu 5.x): a queue is one list per priority step, ``<queue>`` for step 0 and
``<queue><sep><step>`` otherwise; producers LPUSH at the head and consumers BRPOP/RPOP at the
tail. A message a consumer took but has not acknowledged sits in the ``unacked`` hash (field
= delivery tag, value = JSON ``[message, exchange, routing_key]``) with its delivery time in
the ``unacked_index`` sorted set. Every key carries the ``global_keyprefix`` transport option.

Pass a plain :class:`redis.Redis` client, not the prefixing client of a kombu channel: the
key prefix is applied here.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis
from kombu.transport.redis import Mutex, MutexHeld
from kombu.utils.json import dumps, loads

from .messages import fast_task_id, task_id_of
from .result import SweepResult

if TYPE_CHECKING:
    import kombu

__all__ = ["queue_keys", "settings_from_connection", "sweep_queues", "sweep_unacked"]

logger = logging.getLogger(__name__)

#: kombu's defaults (``kombu.transport.redis.Channel``).
DEFAULT_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
DEFAULT_SEP = "\x06\x16"
BINDING_PREFIX = "_kombu.binding."
#: Priority bounds of kombu's virtual channel (``min_priority``/``max_priority``).
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 9, 0

#: How far around the expected index the removal script looks before a full LPOS search.
SEARCH_WINDOW = 64
#: Most targets handed to one script call (each costs two walks into the list).
SCRIPT_BATCH = 100
#: Pending targets are removed at least every this many chunks.
FLUSH_EVERY = 5
#: How often one list sweep may lose and look up its place before it gives up (partial).
MAX_RELOCATIONS = 1_000
#: How often one ``unacked`` entry is retried when its WATCHed keys keep changing.
WATCH_RETRIES = 50

# Removes listed messages from one list, atomically. KEYS[1] is the list. ARGV[1] is a
# tombstone unique to the sweep, ARGV[2] the search window, ARGV[3] a first guess of the
# drift (how far entries moved towards the tail since their expected index was worked out),
# then pairs of (expected index counted from the tail, exact value). The drift found for one
# message is the guess for the next. Each message is checked by value where it should be (or
# found nearby, else by LPOS), overwritten with the tombstone, and all tombstones are removed
# with one LREM from the nearer end before the script returns, so no client ever sees one.
# Returns {drift, found_1, found_2, ...} with found_i 1 when the i-th message was removed.
_REMOVE_LUA = """
local key = KEYS[1]
local tomb = ARGV[1]
local window = tonumber(ARGV[2])
local drift = tonumber(ARGV[3])
local out = {0}
local count = 0
local nearest = nil
local farthest = nil
for i = 4, #ARGV, 2 do
  local hint = tonumber(ARGV[i])
  local value = ARGV[i + 1]
  local at = hint + drift
  local pos = false
  if at < 0 and redis.call('LINDEX', key, at) == value then
    pos = at
  else
    local len = redis.call('LLEN', key)
    local lo = at - window
    local hi = at + window
    if hi > -1 then hi = -1 end
    if lo < -len then lo = -len end
    if lo <= hi then
      local near = redis.call('LRANGE', key, lo, hi)
      for j = 1, #near do
        if near[j] == value then
          pos = lo + j - 1
          break
        end
      end
    end
    if not pos and len > 0 then
      local rank = -1
      if -at > len / 2 then rank = 1 end
      local found = redis.call('LPOS', key, value, 'RANK', rank)
      if found then pos = found - len end
    end
    if pos then drift = pos - hint end
  end
  if pos then
    redis.call('LSET', key, pos, tomb)
    count = count + 1
    out[#out + 1] = 1
    if nearest == nil or -pos < nearest then nearest = -pos end
    if farthest == nil or -pos > farthest then farthest = -pos end
  else
    out[#out + 1] = 0
  end
end
if count > 0 then
  local len = redis.call('LLEN', key)
  if farthest <= len - nearest + 1 then
    redis.call('LREM', key, -count, tomb)
  else
    redis.call('LREM', key, count, tomb)
  end
end
out[1] = drift
return out
"""


def _check_client(client: redis.Redis[Any]) -> None:
    if getattr(client, "global_keyprefix", ""):
        raise TypeError(
            "jobreaper: pass a plain redis.Redis client (this one prefixes keys itself); "
            "give the prefix as global_keyprefix instead"
        )
    if client.connection_pool.connection_kwargs.get("decode_responses"):
        raise TypeError(
            "jobreaper: pass a redis.Redis client with decode_responses=False; "
            "queue entries are compared byte for byte and need not be UTF-8"
        )


def _priority_step(priority: int, steps: Sequence[int]) -> int:
    """kombu's ``Channel.priority``: the step a priority is stored under."""
    return steps[bisect.bisect(steps, priority) - 1]


def _list_key(queue: str, step: int, sep: str, prefix: str) -> str:
    return f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}"


def queue_keys(
    queue: str,
    *,
    priority_steps: Sequence[int] = DEFAULT_PRIORITY_STEPS,
    sep: str = DEFAULT_SEP,
    global_keyprefix: str = "",
) -> list[str]:
    """The Redis list keys of *queue*, one per priority step, in kombu's consuming order."""
    keys: list[str] = []
    for step in priority_steps:
        key = _list_key(queue, _priority_step(step, priority_steps), sep, global_keyprefix)
        if key not in keys:
            keys.append(key)
    return keys


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _rindex(values: list[Any], value: Any) -> int | None:
    for i in range(len(values) - 1, -1, -1):
        if values[i] == value:
            return i
    return None


@dataclasses.dataclass
class _Pending:
    """A target waiting for removal: where it was read, and the shift seen until then."""

    index: int
    shift: int
    task_id: str


class _ListSweep:
    """One pass over one list, from the tail (next to be consumed) towards the head.

    Entries are read in chunks by index counted from the tail. Consumers popping the tail and
    kombu restoring to it shift those indices, so the position is kept by value: the
    head-most entry examined so far that stays in the list (the *anchor*) is looked up again
    in each new read, and only entries on its head side are new; how far it moved is added
    up in ``total_shift``. If the anchor is gone, everything examined on its tail side was
    consumed, so the pass restarts at the tail with nothing left behind.

    Targets are collected in ``pending`` and removed a few chunks at a time (at once near
    the tail, where consumers will reach them soon), so that the removal script, which walks
    to its entries from the nearer end of the list, runs a few times per list rather than
    once per chunk.
    """

    def __init__(
        self,
        client: redis.Redis[Any],
        key: str,
        should_remove: Callable[[str], bool],
        *,
        chunk: int,
        dry_run: bool,
        script: Any,
        tombstone: str,
        result: SweepResult,
    ) -> None:
        self.client = client
        self.key = key
        self.should_remove = should_remove
        self.chunk = chunk
        self.dry_run = dry_run
        self.script = script
        self.tombstone = tombstone
        self.result = result
        self.unparsable = 0
        self.examined = 0
        self.anchor: bytes | None = None
        self.anchor_at = 0  # expected index (from the tail, negative) of the anchor
        self.total_shift = 0
        self.pending: dict[bytes, _Pending] = {}
        self.pending_chunks = 0

    def run(self) -> None:
        client, key, chunk = self.client, self.key, self.chunk
        try:
            initial = int(client.llen(key))
        except redis.ResponseError as error:  # WRONGTYPE: not a list
            logger.warning("jobreaper: %r is not a queue list (%s); left alone", key, error)
            return
        if not initial:
            return
        # Bound the work if producers refill the list faster than it is read.
        budget = 2 * initial + 4 * chunk
        margin = SEARCH_WINDOW
        relocations = 0
        while True:
            if relocations > MAX_RELOCATIONS or self.examined > budget:
                self.result.partial = True
                logger.warning(
                    "jobreaper: %r moves faster than it can be swept; stopped after %d entries",
                    key,
                    self.examined,
                )
                break
            if self.anchor is None:
                lo, hi = -chunk, -1
            else:
                hi = min(self.anchor_at + margin, -1)
                lo = self.anchor_at - chunk
            values: list[bytes] = client.lrange(key, lo, hi)
            if not values and self.anchor is None:
                break
            if values and self.anchor is None:
                fresh_end = len(values)
            else:
                k = _rindex(values, self.anchor) if values else None
                if k is None:
                    # The anchor left the window (or the list shrank past it): find it again.
                    relocations += 1
                    moved = self._relocate()
                    margin = min(chunk, max(SEARCH_WINDOW, 2 * abs(moved or 0)))
                    continue
                base = hi - len(values) + 1
                moved = self._moved_to(base + k)
                margin = min(chunk, max(SEARCH_WINDOW, 2 * abs(moved)))
                fresh_end = k
            reached_head = len(values) < hi - lo + 1
            base = hi - len(values) + 1  # index of values[0] when read
            stuck = self._examine(values, fresh_end, base)
            if self._should_flush(stuck or reached_head):
                self._flush()
            if reached_head:
                break
        self._flush()
        self.result.scanned += self.examined
        if self.unparsable:
            self.result.unparsable += self.unparsable
            logger.warning(
                "jobreaper: %d entries of %r are not task messages we can read; left untouched",
                self.unparsable,
                key,
            )

    def _expected(self, pending: _Pending) -> int:
        return pending.index + self.total_shift - pending.shift

    def _moved_to(self, index: int) -> int:
        """The anchor was seen at *index*: record the shift; return it."""
        moved = index - self.anchor_at
        self.total_shift += moved
        self.anchor_at = index
        return moved

    def _relocate(self) -> int | None:
        """Look the anchor up; return how far it moved, or None if it is gone."""
        assert self.anchor is not None
        with self.client.pipeline(transaction=True) as pipe:
            pipe.lpos(self.key, self.anchor, rank=-1)
            pipe.llen(self.key)
            found, length = pipe.execute()
        if found is not None:
            return self._moved_to(int(found) - int(length))
        # Consumed, and with it every entry examined on its tail side (pending targets
        # included): forget those and start over at the tail.
        self.pending = {
            value: pending
            for value, pending in self.pending.items()
            if self._expected(pending) < self.anchor_at
        }
        self.anchor = None
        return None

    def _examine(self, values: list[bytes], end: int, base: int) -> bool:
        """Examine ``values[:end]`` (``values[0]`` was at index *base*); move the anchor.

        Returns True when the entries were all targets, so none can be the anchor and the
        targets must go before the sweep can move on.
        """
        should_remove = self.should_remove
        anchor_j: int | None = None
        for j in range(end):
            value = values[j]
            task_id = fast_task_id(value)
            if task_id is None or should_remove(task_id):
                # Not recognised by the fast path, or a target: decide on the full parse.
                task_id = task_id_of(value)
                if task_id is None:
                    self.unparsable += 1
                elif should_remove(task_id):
                    if self.dry_run:
                        self.result.removed.append((task_id, self.key))
                    else:
                        known = self.pending.get(value)
                        if known is not None:  # read again: it is on the anchor's head side
                            known.index, known.shift = base + j, self.total_shift
                            continue
                        self.examined += 1
                        self.pending[value] = _Pending(base + j, self.total_shift, task_id)
                        continue
            self.examined += 1
            if anchor_j is None:
                anchor_j = j
        if anchor_j is None:
            return end > 0
        self.anchor = values[anchor_j]
        self.anchor_at = base + anchor_j
        return False

    def _should_flush(self, now: bool) -> bool:
        if not self.pending:
            return False
        self.pending_chunks += 1
        if now or len(self.pending) >= SCRIPT_BATCH or self.pending_chunks >= FLUSH_EVERY:
            return True
        # Close to the tail, consumers will reach them soon.
        nearest = max(self._expected(pending) for pending in self.pending.values())
        return -nearest <= 2 * self.chunk

    def _flush(self) -> None:
        """Remove the pending targets, head-side batches first.

        Removing an entry shifts only the entries on its head side, so later (tail-side)
        batches keep their expected indices.
        """
        if not self.pending:
            return
        targets = sorted(
            ((self._expected(p), value, p.task_id) for value, p in self.pending.items()),
            key=lambda target: target[0],
        )
        self.pending.clear()
        self.pending_chunks = 0
        drift = 0
        tail_side_removed = 0
        for start in range(0, len(targets), SCRIPT_BATCH):
            batch = targets[start : start + SCRIPT_BATCH]
            args: list[Any] = [self.tombstone, SEARCH_WINDOW, drift]
            for index, value, _ in batch:
                args.extend((index, value))
            reply = self.script(keys=[self.key], args=args)
            drift = int(reply[0])
            for (index, _, task_id), flag in zip(batch, reply[1:], strict=True):
                if int(flag):
                    self.result.removed.append((task_id, self.key))
                    if index > self.anchor_at:
                        tail_side_removed += 1
                else:
                    logger.debug(
                        "jobreaper: %s left %r before it could be removed", task_id, self.key
                    )
        # The script saw how far entries moved since the last look at the anchor.
        self.total_shift += drift
        self.anchor_at += drift + tail_side_removed


def sweep_queues(
    client: redis.Redis[Any],
    queues: Sequence[str],
    should_remove: Callable[[str], bool],
    *,
    priority_steps: Sequence[int] = DEFAULT_PRIORITY_STEPS,
    sep: str = DEFAULT_SEP,
    global_keyprefix: str = "",
    chunk: int = 10_000,
    dry_run: bool = False,
) -> SweepResult:
    """Remove the messages whose task id satisfies *should_remove* from *queues*.

    Every priority list of every queue is read once, in chunks of *chunk* entries, starting
    at the tail (the messages consumed next). Targets are removed every few chunks (at once
    near the tail) by short Lua scripts, at most 100 targets each, that check every target
    by exact value at its expected index (looking around it, then searching, if the list
    moved) before removing it; so every other entry keeps its place and order, a message
    already taken by a consumer is simply not found, and the sweep is safe while live
    workers push and pop the same lists. Entries whose task id cannot be read (not JSON, no
    headers, another producer's format) are counted in ``unparsable`` and never touched.
    ``removed`` lists ``(task_id, list key)``. *dry_run* reports what would be removed and
    changes nothing. *client* must be a plain client that does not decode responses.

    Limits: Redis lists have no delete-by-index, so a script walks from the nearer end of
    the list to its entries: about 15 ms on average and 40 ms at most inside Redis for a
    million-entry list of 1 kB messages (``benchmarks/bench_redis_sweep.py``). A concurrent
    remover of the same list (say another sweep) can make this one examine, and count, some
    entries twice; it never makes it remove a wrong one. If the list moves faster than it
    can be read, the sweep stops and marks the result ``partial``.
    """
    _check_client(client)
    if chunk < 1:
        raise ValueError("chunk must be positive")
    result = SweepResult()
    script = None if dry_run else client.register_script(_REMOVE_LUA)
    tombstone = f"jobreaper-tombstone:{uuid.uuid4().hex}"
    for queue in queues:
        for key in queue_keys(
            queue, priority_steps=priority_steps, sep=sep, global_keyprefix=global_keyprefix
        ):
            _ListSweep(
                client,
                key,
                should_remove,
                chunk=chunk,
                dry_run=dry_run,
                script=script,
                tombstone=tombstone,
                result=result,
            ).run()
    if result.removed:
        logger.info(
            "jobreaper: %s %d message(s) from %s",
            "would remove" if dry_run else "removed",
            len(result.removed),
            ", ".join(sorted(set(queues))),
        )
    return result


# --- unacked ---------------------------------------------------------------------------


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
        parts = _text(member).split(sep)
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
        entry = loads(_text(raw))
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


class _UnackedSweep:
    def __init__(
        self,
        client: redis.Redis[Any],
        *,
        is_live: Callable[[str], bool],
        should_drop: Callable[[str], bool],
        ceiling: float,
        unacked_key: str,
        index_key: str,
        priority_steps: Sequence[int],
        sep: str,
        prefix: str,
        dry_run: bool,
    ) -> None:
        self.client = client
        self.is_live = is_live
        self.should_drop = should_drop
        self.ceiling = ceiling
        self.unacked_key = unacked_key
        self.index_key = index_key
        self.priority_steps = priority_steps
        self.sep = sep
        self.prefix = prefix
        self.dry_run = dry_run
        self.result = SweepResult()

    def run(self) -> SweepResult:
        stale = cast(Any, self.client).zrange(
            self.index_key, "-inf", self.ceiling, byscore=True, withscores=True
        )
        for tag, _score in stale:
            self.result.scanned += 1
            self._settle(tag)
        return self.result

    def _settle(self, tag: bytes | str) -> None:
        for _ in range(WATCH_RETRIES):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    self._settle_once(pipe, tag)
                    return
                except redis.WatchError:
                    continue
        logger.warning(
            "jobreaper: unacked entry %s kept changing under the sweep; left as it is",
            _text(tag),
        )

    def _settle_once(self, pipe: Any, tag: bytes | str) -> None:
        """One WATCH/MULTI attempt for *tag*; raises WatchError if raced."""
        pipe.watch(self.unacked_key, self.index_key)
        score = pipe.zscore(self.index_key, tag)
        raw = pipe.hget(self.unacked_key, tag)
        if score is None or raw is None or float(score) > self.ceiling:
            return  # acknowledged, restored or delivered again meanwhile
        parsed = _parse_unacked(raw)
        task_id = task_id_of(parsed[0]) if parsed else None
        if parsed is None or task_id is None:
            self.result.unparsable += 1
            logger.warning(
                "jobreaper: unacked entry %s in %r is not a task message we can read; "
                "left as it is",
                _text(tag),
                self.unacked_key,
            )
            return
        if self.is_live(task_id):
            return
        payload, exchange, routing_key = parsed
        if self.should_drop(task_id):
            if not self.dry_run:
                pipe.multi()
                pipe.zrem(self.index_key, tag)
                pipe.hdel(self.unacked_key, tag)
                pipe.execute()
            self.result.dropped_unacked.append((task_id, _text(tag)))
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
        step = _priority_step(_message_priority(payload), self.priority_steps)
        keys = [_list_key(queue, step, self.sep, self.prefix) for queue in queues]
        body = _redelivered(payload)
        if not self.dry_run:
            pipe.multi()
            pipe.zrem(self.index_key, tag)
            pipe.hdel(self.unacked_key, tag)
            for key in keys:
                pipe.rpush(key, body)
            pipe.execute()
        self.result.restored.extend((task_id, key) for key in keys)


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
    """Settle ``unacked`` entries delivered more than *grace* seconds ago to no live worker.

    An entry whose ``unacked_index`` score is at most ``now - grace`` and whose task id is not
    ``is_live(task_id)`` is dropped (HDEL + ZREM) when ``should_drop(task_id)``, otherwise
    put back on its queue at once the way kombu's ``restore_by_tag`` does: redelivered
    flags set, RPUSHed (consumed next) to the priority list of every queue its exchange and
    routing key reach through the ``_kombu.binding.<exchange>`` sets. Each entry is settled
    in its own WATCH/MULTI transaction, all under kombu's ``unacked_mutex`` taken without
    waiting: if another party holds it, nothing is done and an empty result is returned.
    Unreadable entries, and entries no queue is bound for (kombu would lose those), are left
    as they are and counted in ``unparsable``. *dry_run* only reads (no mutex).
    """
    _check_client(client)
    now = time.time() if now is None else now
    sweep = _UnackedSweep(
        client,
        is_live=is_live,
        should_drop=should_drop,
        ceiling=now - grace,
        unacked_key=global_keyprefix + unacked_key,
        index_key=global_keyprefix + unacked_index_key,
        priority_steps=priority_steps,
        sep=sep,
        prefix=global_keyprefix,
        dry_run=dry_run,
    )
    if dry_run:
        result = sweep.run()
    else:
        try:
            with Mutex(client, global_keyprefix + unacked_mutex_key, unacked_mutex_expire):
                result = sweep.run()
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


def settings_from_connection(conn: kombu.Connection) -> dict[str, Any]:
    """The Redis transport options used above, from *conn*, with kombu's defaults.

    Keys: ``global_keyprefix``, ``priority_steps``, ``sep``, ``unacked_key``,
    ``unacked_index_key``, ``unacked_mutex_key``, ``unacked_mutex_expire`` and
    ``visibility_timeout``; all but the last are keyword arguments of :func:`sweep_unacked`
    (the first three of :func:`sweep_queues` too).
    """
    from kombu.transport.redis import Channel

    options: Mapping[str, Any] = conn.transport_options or {}

    def option(name: str) -> Any:
        value = options.get(name)
        return getattr(Channel, name) if value is None else value

    return {
        "global_keyprefix": str(option("global_keyprefix") or ""),
        "priority_steps": tuple(int(step) for step in option("priority_steps")),
        "sep": str(option("sep")),
        "unacked_key": str(option("unacked_key")),
        "unacked_index_key": str(option("unacked_index_key")),
        "unacked_mutex_key": str(option("unacked_mutex_key")),
        "unacked_mutex_expire": int(option("unacked_mutex_expire")),
        "visibility_timeout": float(option("visibility_timeout")),
    }
