"""Logging's locks, safe for jobreaper's real threads under gevent's monkey-patching.

Once gevent has patched ``threading``, the ``logging`` module's lock and every handler's lock
are gevent locks. A gevent lock is woken across threads by the hub of the thread that first
took it: for logging's locks, the main thread's hub. While a task that never yields blocks
that hub (CPU-bound code under ``-P gevent``), a jobreaper thread that has to wait for one of
them -- because the other jobreaper thread holds it for a moment: a log line of each loop,
``logging.getLogger`` or an ``isEnabledFor`` cache miss in SQLAlchemy or kombu -- is never
woken: it sits in its own hub forever, its heartbeat stops, the worker is judged dead and its
live jobs are settled (DESIGN §2.1).

:func:`share_logging_locks` gives logging's lock and each handler's lock a
:class:`SharedRLock`: greenlets still wait for each other the gevent way, a jobreaper thread
waits on a lock of the OS and is woken by whoever releases it, whatever the hub does.
"""

from __future__ import annotations

import logging
from typing import Any

from . import native


class SharedRLock:
    """A reentrant lock for the greenlets of hub threads and for jobreaper's real threads.

    A caller in a jobreaper loop thread (:func:`~celery_jobreaper.native.in_loop_thread`)
    takes only the lock of the OS. Any other caller first takes *green* (the gevent lock it
    replaces: greenlets of one thread wait for each other cooperatively, as before), then the
    lock of the OS. That lock is held across a switch only by a greenlet whose handler itself
    switches (a network handler); a jobreaper thread then waits until that greenlet is done.
    """

    def __init__(self, green: Any) -> None:
        self._green = green
        self._native = native.real_rlock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (as ``threading.RLock.acquire``)."""
        if native.in_loop_thread():
            return bool(self._native.acquire(blocking, timeout))
        if not self._green.acquire(blocking, timeout):
            return False
        if not self._native.acquire(blocking):  # held by a loop thread for a moment at most
            self._green.release()
            return False
        return True

    def release(self) -> None:
        """Give the lock back (as ``threading.RLock.release``)."""
        self._native.release()
        if not native.in_loop_thread():
            self._green.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _at_fork_reinit(self) -> None:
        """In a forked child (``logging``'s at-fork hook): both locks are new and free."""
        self._green._at_fork_reinit()
        self._native._at_fork_reinit()


def share_logging_locks() -> None:
    """Under monkey-patching, give logging's module lock and every existing handler's lock a
    :class:`SharedRLock` (once each); call it from the hub's thread, before jobreaper's
    threads start. A handler added later keeps gevent's lock."""
    if not native.patched():
        return
    lock = getattr(logging, "_lock", None)
    if lock is not None and not isinstance(lock, SharedRLock):
        with lock:  # nobody is inside logging's critical sections while it is replaced
            logging._lock = SharedRLock(lock)  # type: ignore[attr-defined]
    for ref in list(getattr(logging, "_handlerList", [])):
        handler = ref()
        if handler is None or isinstance(handler.lock, SharedRLock) or handler.lock is None:
            continue
        old = handler.lock
        with old:
            handler.lock = SharedRLock(old)
