"""The broker sweep's Redis side: queue lists, dead workers' ``unacked`` entries, queued ids.

The ``redis`` client library is imported here only when the app's broker is Redis (it is an
optional extra); without it a clear :class:`~celery_jobreaper.errors.MissingExtraError` names
the extra to install.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from . import workerstate
from .broker.messages import fast_task_id, task_id_of
from .broker.result import SweepResult
from .errors import MissingExtraError
from .extras import install_hint

if TYPE_CHECKING:
    from types import ModuleType

logger = logging.getLogger(__name__)


def module() -> ModuleType:
    """The Redis sweep package, imported only when the broker is Redis."""
    try:
        from .broker import redis as redis_sweep
    except ImportError as error:
        raise MissingExtraError(
            "jobreaper: the broker is Redis but the redis client library is not installed: "
            + install_hint("redis")
        ) from error
    return redis_sweep


def plain_client(conn: Any) -> Any:
    """A plain client on the kombu channel's own pool (no key prefixing)."""
    module()
    import redis

    return redis.Redis(connection_pool=conn.default_channel.client.connection_pool)


def sweep_lists(
    conn: Any, queues: list[str], targets: Collection[str], *, dry: bool
) -> SweepResult:
    """Remove the targets' messages from the lists of *queues*."""
    redis_sweep = module()
    options = redis_sweep.settings_from_connection(conn)
    result: SweepResult = redis_sweep.sweep_queues(
        plain_client(conn),
        queues,
        targets.__contains__,
        dry_run=dry,
        priority_steps=options["priority_steps"],
        sep=options["sep"],
        global_keyprefix=options["global_keyprefix"],
    )
    return result


def settle_dead_unacked(
    app: Any,
    conn: Any,
    *,
    grace: float,
    timeout: float,
    known_live: Collection[str],
    targets: Collection[str],
    dry: bool,
) -> SweepResult:
    """Drop or restore the old ``unacked`` entries that no worker on the broker holds.

    One snapshot of the entries (delivered more than *grace* seconds ago) is read first;
    every worker on the broker is then asked about exactly those entries
    (:mod:`.broker.holders`), and only those entries are acted on, each re-checked by value
    under kombu's ``unacked_mutex``. If any worker on the broker cannot answer, nothing is
    restored or dropped this time. Entries of *targets* are dropped, the others restored.
    """
    from .broker import holders

    redis_sweep = module()
    client = plain_client(conn)
    options = redis_sweep.settings_from_connection(conn)
    keys = {k: options[k] for k in ("unacked_key", "unacked_index_key", "global_keyprefix")}
    entries = redis_sweep.read_unacked(client, ceiling=time.time() - grace, **keys)
    if not entries:
        return SweepResult()
    try:
        held = holders.ask_holders(
            app,
            conn,
            client,
            options["global_keyprefix"],
            tags=[e.tag for e in entries],
            ids={e.task_id for e in entries if e.task_id},
            timeout=timeout,
            known_live=known_live,
        )
    except Exception as error:
        logger.warning(
            "jobreaper: could not ask workers about unacked messages (%s); leaving them for now",
            error,
        )
        return SweepResult()
    if held is None:
        return SweepResult()
    held_ids = held.ids | workerstate.held_task_ids()
    settle_options = {
        k: options[k]
        for k in (
            "unacked_key",
            "unacked_index_key",
            "unacked_mutex_key",
            "unacked_mutex_expire",
            "priority_steps",
            "sep",
            "global_keyprefix",
        )
    }
    result: SweepResult = redis_sweep.settle_unacked(
        client,
        entries,
        is_held=lambda e: e.tag in held.tags or e.task_id in held_ids,
        should_drop=targets.__contains__,
        dry_run=dry,
        **settle_options,
    )
    return result


def settled_gone(
    conn: Any, candidates: Collection[str], result: SweepResult, queues: Iterable[str]
) -> set[str]:
    """Of *candidates* (settled jobs' task ids), those whose message is gone for sure.

    Looked for everywhere a message of this Redis broker can be: every queue bound on it
    (kombu's ``_kombu.binding.*`` sets, plus *queues*, this worker's), each at every priority
    step, and the ``unacked`` hash at any age (a message a live worker holds is there, and
    kombu restores only what is there). The hash is read before and after the lists: a
    message moving between a list and the hash (a worker taking it, a restore) is seen in
    one of the three reads. An id restored by this sweep (*result*) is not gone. What looks
    gone is looked for once more (lists, then the hash) before it is declared gone.
    """
    wanted = set(candidates)
    if not wanted:
        return set()
    redis_sweep = module()
    client = plain_client(conn)
    options = redis_sweep.settings_from_connection(conn)

    def in_unacked() -> set[str]:
        entries = redis_sweep.read_unacked(
            client,
            ceiling=float("inf"),
            unacked_key=options["unacked_key"],
            unacked_index_key=options["unacked_index_key"],
            global_keyprefix=options["global_keyprefix"],
        )
        return {e.task_id for e in entries if e.task_id in wanted}

    present = in_unacked()
    everywhere = sorted(
        set(queues)
        | redis_sweep.bound_queues(
            client, sep=options["sep"], global_keyprefix=options["global_keyprefix"]
        )
    )
    present |= _ids_in_lists(client, options, everywhere) & wanted
    present |= in_unacked()
    present |= {t for t, _ in result.restored}
    gone = wanted - present
    if gone:
        # A list read in chunks while another sweep removes entries ahead of the reader
        # shifts later entries back past it: confirm with a second look before forgetting.
        gone -= _ids_in_lists(client, options, everywhere)
        gone -= in_unacked()
    return gone


def _ids_in_lists(client: Any, options: dict[str, Any], queues: Iterable[str]) -> set[str]:
    """Task ids of the messages in the lists of *queues* (every priority step).

    The lengths are read first, pipelined (a broker with many bound queues, most of them
    empty, costs a few round trips); only non-empty lists are read, in chunks.
    """
    redis_sweep = module()
    keys = [
        key
        for queue in queues
        for key in redis_sweep.queue_keys(
            queue,
            priority_steps=options["priority_steps"],
            sep=options["sep"],
            global_keyprefix=options["global_keyprefix"],
        )
    ]
    found: set[str] = set()
    for at in range(0, len(keys), 1000):
        part = keys[at : at + 1000]
        with client.pipeline(transaction=False) as pipe:
            for key in part:
                pipe.llen(key)
            lengths = pipe.execute()
        for key, length in zip(part, lengths, strict=True):
            start = 0
            while length:  # read to the end, even if it grew meanwhile
                chunk = client.lrange(key, start, start + 9999)
                for raw in chunk:
                    task_id = fast_task_id(raw) or task_id_of(raw)
                    if task_id:
                        found.add(task_id)
                if len(chunk) < 10000:
                    break
                start += len(chunk)
    return found


def queued_ids(conn: Any, queues: Iterable[str]) -> set[str]:
    """Task ids of the messages waiting in the lists of *queues* and of every queue bound on
    this Redis (a job's message may wait in a queue this worker does not consume)."""
    redis_sweep = module()
    options = redis_sweep.settings_from_connection(conn)
    client = plain_client(conn)
    everywhere = set(queues) | redis_sweep.bound_queues(
        client, sep=options["sep"], global_keyprefix=options["global_keyprefix"]
    )
    return _ids_in_lists(client, options, everywhere)
