"""Remove exact messages from kombu's Redis queue lists, safely while workers use them."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis

from ..messages import fast_task_id, task_id_of
from ..result import SweepResult
from .budget import LOOP_BUDGET_US, Pace, expired_copy
from .keys import DEFAULT_PRIORITY_STEPS, DEFAULT_SEP, check_client, queue_keys
from .lua import REMOVE_LUA

logger = logging.getLogger(__name__)

#: How far around the expected index the removal script looks before a full LPOS search.
SEARCH_WINDOW = 64
#: Most targets handed to one script call (it may do fewer: see :class:`Pace`).
SCRIPT_BATCH = 100
#: Pending targets are removed at least every this many chunks.
FLUSH_EVERY = 5
#: How often one list sweep may lose and look up its place before it gives up (partial).
MAX_RELOCATIONS = 1_000


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
    value: bytes


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
        pace: Pace,
    ) -> None:
        self.client = client
        self.key = key
        self.should_remove = should_remove
        self.chunk = chunk
        self.dry_run = dry_run
        self.script = script
        self.tombstone = tombstone
        self.result = result
        self.pace = pace
        self.unparsable = 0
        self.examined = 0
        self.anchor: bytes | None = None
        self.anchor_at = 0  # expected index (from the tail, negative) of the anchor
        self.total_shift = 0
        self.pending: list[_Pending] = []
        #: The pending targets right on the head side of the anchor, head first: the next
        #: read sees them again, just before the anchor (identical bodies are distinct).
        self.head_run: list[_Pending] = []
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
        # A bounded read around where it was, not an LPOS walk from an end (that would hold
        # Redis for as long as the list is deep). Farther than that counts as consumed: the
        # sweep starts over at the tail, which costs time and never a wrong removal.
        lo = self.anchor_at - self.chunk // 4
        hi = min(self.anchor_at + self.chunk, -1)
        values: list[bytes] = self.client.lrange(self.key, lo, hi)
        k = _rindex(values, self.anchor) if values else None
        if k is not None:
            return self._moved_to(hi - len(values) + 1 + k)
        # Consumed, and with it every entry examined on its tail side (pending targets
        # included): forget those, remove the others now and start over at the tail.
        self.pending = [p for p in self.pending if self._expected(p) < self.anchor_at]
        self._flush()
        self.anchor = None
        return None

    def _examine(self, values: list[bytes], end: int, base: int) -> bool:
        """Examine ``values[:end]`` (``values[0]`` was at index *base*); move the anchor.

        Returns True when the entries were all targets, so none can be the anchor and the
        targets must go before the sweep can move on.
        """
        should_remove = self.should_remove
        anchor_j: int | None = None
        seen_again = self._seen_again(values, end)
        fresh: list[_Pending] = []
        for j in range(end):
            value = values[j]
            if seen_again and j >= end - len(seen_again):
                known = seen_again[j - end + len(seen_again)]
                known.index, known.shift = base + j, self.total_shift
                if anchor_j is None:
                    fresh.append(known)
                continue
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
                        self.examined += 1
                        pending = _Pending(base + j, self.total_shift, task_id, value)
                        self.pending.append(pending)
                        if anchor_j is None:
                            fresh.append(pending)
                        continue
            self.examined += 1
            if anchor_j is None:
                anchor_j = j
        if anchor_j is None:
            self.head_run = fresh  # all on the head side of the same anchor
            return end > 0
        self.head_run = fresh
        self.anchor = values[anchor_j]
        self.anchor_at = base + anchor_j
        return False

    def _seen_again(self, values: list[bytes], end: int) -> list[_Pending]:
        """The head run, if ``values[:end]`` ends with it (it does unless it was removed)."""
        run = self.head_run
        if not run or len(run) > end:
            return []
        if [p.value for p in run] != values[end - len(run) : end]:
            return []
        return run

    def _should_flush(self, now: bool) -> bool:
        if not self.pending:
            return False
        self.pending_chunks += 1
        if now or len(self.pending) >= SCRIPT_BATCH or self.pending_chunks >= FLUSH_EVERY:
            return True
        # Close to the tail, consumers will reach them soon.
        nearest = max(self._expected(pending) for pending in self.pending)
        return -nearest <= 2 * self.chunk

    def _flush(self) -> None:
        """Remove the pending targets, head-side batches first.

        Removing an entry shifts only the entries on its head side, so later (tail-side)
        batches keep their expected indices.
        """
        if not self.pending:
            return
        targets = sorted(
            ((self._expected(p), p.value, p.task_id) for p in self.pending),
            key=lambda target: target[0],
        )
        self.pending = []
        self.head_run = []
        self.pending_chunks = 0
        drift = 0
        tail_side_removed = 0
        start = 0
        while start < len(targets):
            batch = targets[start : start + SCRIPT_BATCH]
            args: list[Any] = [
                self.tombstone,
                SEARCH_WINDOW,
                drift,
                self.pace.reach,
                LOOP_BUDGET_US,
            ]
            for index, value, _ in batch:
                args.extend((index, value, expired_copy(value)))
            reply = self.script(keys=[self.key], args=args)
            drift = int(reply[0])
            self.pace.observe(int(reply[2]), int(reply[3]))
            flags = [int(flag) for flag in reply[4:]]
            if not flags:  # the script always handles its first target
                raise RuntimeError("jobreaper: the removal script handled no target")
            start += len(flags)
            for (index, _, task_id), flag in zip(batch, flags, strict=False):
                if flag in (1, 2):
                    self.result.removed.append((task_id, self.key))
                if flag == 1 and index > self.anchor_at:
                    tail_side_removed += 1
                elif flag == 2:
                    self.result.neutralized += 1
                elif flag == 3:
                    self.result.partial = True  # left where it is: look again next time
                    logger.info(
                        "jobreaper: message of task %s is too deep in %r to remove now; "
                        "left for a later sweep",
                        task_id,
                        self.key,
                    )
                elif flag == 4:
                    logger.debug(
                        "jobreaper: %s in %r was neutralized before; left", task_id, self.key
                    )
                elif flag == 0:
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

    Limits: Redis lists have no delete-by-index; taking an entry out means walking to it
    entry by entry from an end (about 35 ms to the middle of a million-entry list of 1 kB
    messages). To hold Redis for a few milliseconds at most per script, targets are removed
    only within a *reach* of either end (adapted to the measured walking speed: about
    20,000 entries of 1 kB); a target deeper than that is neutralized in place, rewritten
    with ``expires`` in the past so that any Celery worker discards it unrun (and records
    it as revoked, "expired"), and counted in ``neutralized`` (and ``removed``); a later
    sweep takes it out once it is within reach. A message without protocol 2 headers that
    is too deep is left for a later sweep (``partial``). A concurrent
    remover of the same list (say another sweep) can make this one examine, and count, some
    entries twice; it never makes it remove a wrong one. If the list moves faster than it
    can be read, the sweep stops and marks the result ``partial``.
    """
    check_client(client)
    if chunk < 1:
        raise ValueError("chunk must be positive")
    result = SweepResult()
    script = None if dry_run else client.register_script(REMOVE_LUA)
    tombstone = f"jobreaper-tombstone:{uuid.uuid4().hex}"
    pace = Pace()
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
                pace=pace,
            ).run()
    if result.removed:
        logger.info(
            "jobreaper: %s %d message(s) from %s",
            "would remove" if dry_run else "removed",
            len(result.removed),
            ", ".join(sorted(set(queues))),
        )
    return result
