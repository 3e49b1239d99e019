"""kombu's Redis key layout: queue lists per priority step, transport options, plain clients.

A queue is one list per priority step, ``<queue>`` for step 0 and ``<queue><sep><step>``
otherwise; producers LPUSH at the head and consumers BRPOP/RPOP at the tail. Every key carries
the ``global_keyprefix`` transport option. Pass a plain :class:`redis.Redis` client, not the
prefixing client of a kombu channel: the key prefix is applied here.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import kombu
    import redis

#: kombu's defaults (``kombu.transport.redis.Channel``).
DEFAULT_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
DEFAULT_SEP = "\x06\x16"
BINDING_PREFIX = "_kombu.binding."
#: Priority bounds of kombu's virtual channel (``min_priority``/``max_priority``).
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 9, 0


def check_client(client: redis.Redis[Any]) -> None:
    """Refuse a key-prefixing or a decoding client (keys are prefixed here, values are bytes)."""
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


def priority_step(priority: int, steps: Sequence[int]) -> int:
    """kombu's ``Channel.priority``: the step a priority is stored under."""
    return steps[bisect.bisect(steps, priority) - 1]


def list_key(queue: str, step: int, sep: str, prefix: str) -> str:
    """The list key of *queue* at priority *step*."""
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
        key = list_key(queue, priority_step(step, priority_steps), sep, global_keyprefix)
        if key not in keys:
            keys.append(key)
    return keys


def bound_queues(
    client: redis.Redis[Any], *, sep: str = DEFAULT_SEP, global_keyprefix: str = ""
) -> set[str]:
    """Every queue bound to any exchange on this Redis (under *global_keyprefix*).

    kombu records each binding as a member ``routing_key<sep>pattern<sep>queue`` of the set
    ``_kombu.binding.<exchange>`` (kept until the queue is deleted), so these are all the
    queues kombu producers can route a message to. The keyspace is walked with ``SCAN``
    (bounded commands, no ``KEYS``).
    """
    check_client(client)
    pattern = _glob_escape(global_keyprefix + BINDING_PREFIX) + "*"
    queues: set[str] = set()
    for key in client.scan_iter(match=pattern, count=1000):
        for member in client.smembers(key):
            parts = text(member).split(sep)
            if len(parts) == 3 and parts[2]:
                queues.add(parts[2])
    return queues


def _glob_escape(value: str) -> str:
    """*value* as a literal in a Redis ``MATCH`` glob."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", value)


def text(value: bytes | str) -> str:
    """*value* as text (bytes decoded as UTF-8, errors replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


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
