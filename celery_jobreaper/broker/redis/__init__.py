"""Remove exact messages from kombu's Redis transport: queue lists and the ``unacked`` hash.

One concept per module: :mod:`.keys` (kombu's key layout and options), :mod:`.lua` (the
removal script), :mod:`.lists` (the queue list sweep), :mod:`.unacked` (dead workers'
unacknowledged messages). Importing this package imports the ``redis`` client library: only
:mod:`celery_jobreaper.sweep` does, and only when the app's broker is Redis.
"""

from __future__ import annotations

from .keys import bound_queues, queue_keys, settings_from_connection
from .lists import sweep_queues
from .lua import REMOVE_LUA
from .unacked import UnackedEntry, read_unacked, settle_unacked, sweep_unacked

_REMOVE_LUA = REMOVE_LUA  # the name the tests used before the split

__all__ = [
    "REMOVE_LUA",
    "UnackedEntry",
    "bound_queues",
    "queue_keys",
    "read_unacked",
    "settings_from_connection",
    "settle_unacked",
    "sweep_queues",
    "sweep_unacked",
]
