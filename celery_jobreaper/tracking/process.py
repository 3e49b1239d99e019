"""This process: connections inherited through fork, and how tasks run here (threads, greenlets)."""

from __future__ import annotations

import sys
import threading

from sqlalchemy.engine import Connection

#: Connections a forked child inherited: kept referenced so that garbage collection never
#: resets or closes them (they are the parent's sessions).
_INHERITED: list[Connection] = []


def _keep_inherited(conn: Connection | None) -> None:
    if conn is not None:
        _INHERITED.append(conn)


def _greened() -> bool:
    """Whether gevent or eventlet is in use: tasks interleave in greenlets, no writer thread."""
    return "gevent" in sys.modules or "eventlet" in sys.modules


def _one_task_at_a_time() -> bool:
    """Whether this thread runs tasks one after another (prefork child, solo, main process).

    Not with ``-P threads`` (tasks run in other threads) nor with gevent/eventlet, where
    greenlets of one thread interleave tasks.
    """
    return threading.current_thread() is threading.main_thread() and not _greened()
