"""How much one removal script may do: its time budget, its reach, and the neutralized copy.

Redis logs a command slower than 10 ms and nothing else runs meanwhile; see
:mod:`celery_jobreaper.broker.redis.lua` for why removing an entry deep in a list is slow.
"""

from __future__ import annotations

from kombu.utils.json import dumps, loads

#: Redis logs a command slower than 10 ms (``slowlog-log-slower-than``); a removal script
#: keeps well below: its loop starts no target after LOOP_BUDGET_US microseconds, and each
#: walk entry by entry (LREM, LPOS) is bounded to what WALK_BUDGET_US lets it cover.
LOOP_BUDGET_US = 1_500
WALK_BUDGET_US = 1_500
#: Bounds of the reach (entries from an end of a list within which targets are removed).
MIN_REACH, MAX_REACH, FIRST_REACH = 1_000, 1_000_000, 20_000
#: ``expires`` of a neutralized message: long past.
EXPIRED = "1970-01-01T00:00:00+00:00"


class Pace:
    """The reach of the removal script, adapted to how fast this Redis walks a list."""

    def __init__(self) -> None:
        self.reach = FIRST_REACH

    def observe(self, walk_us: int, walked: int) -> None:
        """A script's LREMs walked *walked* entries in *walk_us* microseconds."""
        if walked < 2 * MIN_REACH or walk_us <= 0:
            return
        per_entry = walk_us / walked
        self.reach = max(MIN_REACH, min(MAX_REACH, int(WALK_BUDGET_US / per_entry)))


def expired_copy(value: bytes) -> bytes:
    """*value* with ``expires`` in the past (protocol 2); b"=" if it has that already, b""
    if it has no protocol 2 headers.

    Celery discards a message whose ``expires`` has passed before looking at anything else
    (``Request.revoked``): it never runs, as a revoked task's message never runs.
    """
    try:
        message = loads(value)
    except (ValueError, TypeError, RecursionError):
        return b""
    headers = message.get("headers") if isinstance(message, dict) else None
    if not isinstance(headers, dict) or "task" not in headers or "id" not in headers:
        return b""
    if headers.get("expires") == EXPIRED:
        return b"="  # already neutralized
    headers["expires"] = EXPIRED
    text: str = dumps(message)
    return text.encode("utf-8")
