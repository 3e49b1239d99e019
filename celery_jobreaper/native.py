"""Real OS threads for jobreaper's background loops, also under gevent's monkey-patching.

With ``celery worker -P gevent`` Celery monkey-patches the process before anything else runs:
a ``threading.Thread`` is then a greenlet in the hub's thread, and a task that does not yield
(CPU-bound, or blocked inside a C call) starves it. The heartbeat must go on whatever tasks do
-- a stale heartbeat and no reply to a ping (the consumer is a greenlet too) is death (DESIGN
§2.1) -- so the loops run in real threads, started and waited for with the original
``_thread`` primitives (as gevent's own thread pool does). Without monkey-patching these are
the very primitives ``threading`` uses: one code path for every pool.

Under gevent an I/O object belongs to the thread that made it: a patched socket waits on its
creator's hub, and used from another thread fails ("Cannot switch to a different thread").
So :class:`~celery_jobreaper.database.Database` keeps a connection pool per thread and
remote-control calls use a broker connection pool per thread
(:mod:`celery_jobreaper.broadcast`). A gevent lock that these threads share with the hub's
thread is woken by that thread's hub, blocked as long as a task does not yield: logging's locks,
the ones every thread takes, are replaced before the threads start
(:mod:`celery_jobreaper.loglocks`). eventlet is not handled (see README).
"""

from __future__ import annotations

import _thread
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds between two looks at a stopping loop thread in :meth:`Loop.join` (the calling
#: thread sleeps with ``time.sleep``: under gevent that lets the hub serve tasks meanwhile).
JOIN_POLL = 0.01


def patched() -> bool:
    """Whether gevent monkey-patched threads or sockets here (Celery's ``-P gevent`` patches
    everything): a ``threading.Thread`` is a greenlet, a socket belongs to one thread's hub."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(
        monkey.is_module_patched("threading") or monkey.is_module_patched("socket")
    )


def _original(name: str) -> Any:
    """The unpatched ``_thread.<name>`` (gevent keeps the originals of what it patched)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original("_thread", name)
    return getattr(_thread, name)


def thread_ident() -> int:
    """The id of the calling OS thread (under gevent, not of the calling greenlet)."""
    return int(_original("get_ident")())


class StopFlag:
    """Set once, from any thread or greenlet; waited on with a timeout by a real thread."""

    def __init__(self) -> None:
        allocate = _original("allocate_lock")
        self._guard = allocate()
        self._gate = allocate()  # held while not set: a waiter blocks on it
        self._gate.acquire()
        self._set = False

    def set(self) -> None:
        """Wake the waiter now and from then on (never blocks)."""
        with self._guard:
            if not self._set:
                self._set = True
                self._gate.release()

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._set

    def wait(self, timeout: float) -> bool:
        """Block this real thread up to *timeout* seconds; True once the flag is set."""
        if self._gate.acquire(timeout=max(0.0, timeout)):
            self._gate.release()  # stays open for any later wait
            return True
        return self._set


class InLoop:
    """Something that runs in a :class:`Loop` of its own (``self._loop``): started, stopped and
    waited for through it."""

    _loop: Loop

    def start(self) -> None:
        """Start the thread (once)."""
        self._loop.start()

    def stop(self) -> None:
        """Stop after the call in progress, if any."""
        self._loop.stop()

    def join(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the thread to end; True if it did (or if the
        caller is that thread)."""
        return self._loop.is_current() or self._loop.join(timeout)


class Loop:
    """A real thread calling *fn* every *every* seconds until stopped; it survives errors.

    :meth:`kick` makes it call *fn* now (once, however often it is kicked meanwhile),
    :meth:`kick_later` after a delay (the last delay asked for wins). Like a daemon thread,
    it does not keep the interpreter alive.
    """

    def __init__(self, name: str, every: float, fn: Callable[[], None]) -> None:
        self.name = name
        self.every = every
        self.fn = fn
        self._wake = Wakeup()
        self.stopping = _LoopStop(self._wake)
        self._guard = _original("allocate_lock")()
        self._kicked = False
        self._kick_at: float | None = None  # monotonic time of a delayed kick
        self._running: Any = None  # from start_thread: held while the thread runs
        self._ident: int | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        self._running = start_thread(self.name, self._main)

    def kick(self) -> None:
        """Call *fn* as soon as the thread is free (any thread or greenlet; never blocks)."""
        with self._guard:
            self._kicked = True
        self._wake.ring()

    def kick_later(self, delay: float) -> None:
        """Call *fn* in *delay* seconds (replacing a delayed kick still pending)."""
        with self._guard:
            self._kick_at = time.monotonic() + delay
        self._wake.ring()

    def stop(self) -> None:
        """Stop after the current call, if any."""
        self.stopping.set()

    def is_alive(self) -> bool:
        """Whether the thread was started and has not ended."""
        return self._running is not None and bool(self._running.locked())

    def is_current(self) -> bool:
        """Whether the caller runs in this loop's thread."""
        return self._ident is not None and self._ident == thread_ident()

    def join(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the thread to end; True if it did."""
        return self._running is None or wait_released(self._running, timeout)

    def _main(self) -> None:
        self._ident = thread_ident()
        self.run()

    def _due(self, next_due: float) -> bool:
        """Whether *fn* is due now (a kick, a delayed kick that came, or the period over)."""
        now = time.monotonic()
        with self._guard:
            later = self._kick_at is not None and now >= self._kick_at
            fire = self._kicked or later or now >= next_due
            if fire:
                self._kicked = False
                if later:
                    self._kick_at = None
            return fire

    def _wait(self, next_due: float) -> None:
        with self._guard:
            due = next_due if self._kick_at is None else min(next_due, self._kick_at)
        if not self._kicked:
            self._wake.wait(max(0.0, due - time.monotonic()))

    def run(self) -> None:
        """Call *fn* every *every* seconds until :attr:`stopping` is set."""
        last_error: str | None = None
        next_due = time.monotonic() + self.every
        while True:
            self._wait(next_due)
            if self.stopping.is_set():
                return
            if not self._due(next_due):
                continue
            next_due = time.monotonic() + self.every
            try:
                self.fn()
            except Exception as error:
                text = f"{type(error).__name__}: {error}"
                if text == last_error:  # the same failure again: one line, no traceback
                    logger.error(
                        "jobreaper: %s failed again (%s); retrying in %g s",
                        self.name,
                        text.splitlines()[0],
                        self.every,
                    )
                else:
                    logger.exception(
                        "jobreaper: %s failed; retrying in %g s", self.name, self.every
                    )
                last_error = text
            else:
                if last_error is not None:
                    logger.info("jobreaper: %s works again", self.name)
                last_error = None


class Wakeup:
    """A doorbell between threads (greenlets too): rung any number of times, one waiter wakes
    once per ring it has not seen yet; waited on by a real thread with a timeout."""

    def __init__(self) -> None:
        allocate = _original("allocate_lock")
        self._guard = allocate()
        self._gate = allocate()  # held while nobody rang
        self._gate.acquire()
        self._rung = False

    def ring(self) -> None:
        """Wake the waiter (never blocks)."""
        with self._guard:
            if not self._rung:
                self._rung = True
                self._gate.release()

    def wait(self, timeout: float) -> bool:
        """Block up to *timeout* seconds for a ring; True if one came (and it is consumed)."""
        if not self._gate.acquire(timeout=max(0.0, timeout)):
            return False
        with self._guard:
            self._rung = False
        return True


def start_thread(name: str, target: Callable[[], None]) -> Any:
    """Run *target* in a new real thread named *name*; return a lock held while it runs.

    Under monkey-patching, logging's locks are made safe for the new thread first
    (:func:`celery_jobreaper.loglocks.share_logging_locks`)."""
    if patched() and not in_loop_thread():
        from .loglocks import share_logging_locks

        share_logging_locks()
    running = _original("allocate_lock")()
    running.acquire()

    def main() -> None:
        try:
            _loop_threads.inside = True
            threading.current_thread().name = name
            target()
        finally:
            running.release()

    try:
        _original("start_new_thread")(main, ())
    except BaseException:
        running.release()
        raise
    return running


def wait_released(lock: Any, timeout: float) -> bool:
    """Wait up to *timeout* seconds for *lock* (from :func:`start_thread`) to be released."""
    deadline = time.monotonic() + timeout
    while lock.locked() and time.monotonic() < deadline:
        time.sleep(JOIN_POLL)  # gevent's sleep under gevent: the hub goes on meanwhile
    return not lock.locked()


class _LoopStop(StopFlag):
    """A loop's stop flag: setting it also wakes the loop's thread."""

    def __init__(self, wake: Wakeup) -> None:
        super().__init__()
        self._wake_loop = wake

    def set(self) -> None:
        """Stop the loop (its thread wakes now)."""
        super().set()
        self._wake_loop.ring()


def in_loop_thread() -> bool:
    """Whether the caller runs in a thread started by :func:`start_thread`."""
    return bool(getattr(_loop_threads, "inside", False))


def real_rlock() -> Any:
    """A reentrant lock of the OS (not gevent's)."""
    return _original("RLock")()


def real_lock() -> Any:
    """A lock of the OS (not gevent's); hold it only for a moment in the hub's thread."""
    return _original("allocate_lock")()


def thread_local() -> Any:
    """Storage local to the calling OS thread (under gevent, not to the calling greenlet)."""
    return _original("_local")()


#: ``inside`` is True in the threads started by :func:`start_thread`.
_loop_threads = thread_local()
