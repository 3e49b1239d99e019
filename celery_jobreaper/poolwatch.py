"""Make the worker notice a dead prefork pool process at once (Celery may take 5 s).

Why: Celery's prefork pool settles the task of a pool process that died (``WorkerLostError``,
then ``task_failure``, which settles the tracked job; the request leaves the worker's active
set, so a reap may settle its user row) only in ``maintain_pool``, which it runs when the
child's sentinel pipe becomes readable (``AsynPool._event_process_exit``) and on a 5-second
timer (``AsynPool.timers``). The pipe is closed while the kernel tears the child down, often
before the child can be waited for: ``maintain_pool`` then finds no exit code, the sentinel is
no longer watched, and the death waits for the timer (measured: most SIGKILLs; celery/celery
#9588 reports the same race for recycled children).

What: :class:`PoolWatch`, a thread of the worker's main process, waits on copies of the pool
processes' sentinels. When one becomes readable it waits (at most :data:`EXIT_CONFIRM_TIMEOUT`
seconds) until the child really has exited -- ``waitid(..., WNOWAIT)``, which leaves the child
to be reaped by billiard -- and then :class:`HubNudge` asks the worker's event loop to run
``maintain_pool`` now, exactly what Celery's sentinel handler meant to do.

Why that is safe: jobreaper decides nothing here. Celery's own ``maintain_pool`` reads what is
left in the dead child's result pipe first (a task that finished and sent its result just
before the child died succeeds), matches jobs to the processes that accepted them (a sibling
task, or a new pool process that got the same pid, is never touched), checks a stored success,
honours ``reject_on_worker_lost`` / ``retry_on_worker_lost``, and skips a job a hard time
limit already failed; extra calls of it change nothing (Celery runs it every 5 s anyway). Only
after it ran, on the event loop, is a reap asked for (a pool process that exited abnormally),
so the task the worker no longer holds is no longer protected and its user row is settled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds to wait, after a pool process's sentinel became readable, for the process to be a
#: zombie (the kernel closes its descriptors, then makes it waitable: usually well under 1 ms).
EXIT_CONFIRM_TIMEOUT = 1.0
#: Seconds between two looks at a process that is exiting but not yet waitable.
EXIT_CONFIRM_STEP = 0.001
#: Seconds between two looks at the pool for processes it started (or replaced).
REFRESH_INTERVAL = 1.0
#: Exit codes of a pool process that ended normally (billiard's ``EX_OK``, ``EX_RECYCLE``).
NORMAL_EXIT_CODES = (0, 0x9B)


def exit_status(pid: int) -> int | None:
    """The exit code (``-signal`` if killed) of child *pid* once it exited, else ``None``.

    ``WNOWAIT``: the child stays waitable (a zombie) for billiard, who reaps it; while it is a
    zombie its pid cannot be reused. ``None`` too when *pid* is not a child of this process
    (any more): reaped already.
    """
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if result is None or result.si_pid == 0:
        return None
    if result.si_code == os.CLD_EXITED:
        return int(result.si_status)
    return -int(result.si_status)  # killed (or dumped core) by this signal


class HubNudge:
    """Runs the pool's ``maintain_pool`` on the worker's event loop when another thread asks.

    A pipe whose reading end the event loop watches (registered by the bootstep's
    ``register_with_event_loop``, on the loop's own thread, again after each consumer
    restart); :meth:`nudge` writes one byte from any thread. On the loop: drain the pipe, run
    ``maintain_pool``, then call *after_lost* if a pool process had exited abnormally.
    """

    def __init__(self, maintain_pool: Callable[[], Any], after_lost: Callable[[], None]) -> None:
        self.maintain_pool = maintain_pool
        self.after_lost = after_lost
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lost = threading.Event()

    def register(self, hub: Any) -> None:
        """Watch the pipe on *hub* (call on the event loop's thread)."""
        hub.add_reader(self._read, self._on_readable)

    def nudge(self, lost: bool) -> None:
        """Ask the event loop to run ``maintain_pool`` (and a reap, if *lost*); any thread."""
        if lost:
            self._lost.set()
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe: a wake is pending
            os.write(self._write, b"\0")

    def _on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._read, 4096)
        lost = self._lost.is_set()
        self._lost.clear()
        try:
            self.maintain_pool()  # Celery's own: settles what the dead process was running
        finally:
            if lost:
                self.after_lost()  # only sets an event: never blocks the event loop

    def close(self, hub: Any = None) -> None:
        """Stop watching the pipe and close it."""
        if hub is not None:
            with contextlib.suppress(Exception):
                hub.remove_reader(self._read)
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


class PoolWatch(threading.Thread):
    """Waits for pool processes to exit; for each that did, calls ``on_exit(pid, code)``.

    *processes* returns the pool's current process objects (billiard ``Process``: ``pid`` and
    ``_popen.sentinel`` are read, nothing else is touched). Called on this thread, never on the
    event loop; a process is reported once, after it really exited (or after billiard reaped
    it, when its exit code is known from ``_popen.returncode``).
    """

    def __init__(
        self,
        processes: Callable[[], list[Any]],
        on_exit: Callable[[int, int | None], None],
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        super().__init__(name="jobreaper-poolwatch", daemon=True)
        self.processes = processes
        self.on_exit = on_exit
        self.refresh_interval = refresh_interval
        self._watched: dict[int, tuple[Any, int]] = {}  # id(process) -> (process, our fd)
        #: processes reported already or not watchable, by id (held: the id stays theirs)
        self._done: dict[int, Any] = {}
        self._stop_read, self._stop_write = os.pipe()
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Stop the thread (it closes its descriptors on its way out)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._stop_write, b"\0")

    def run(self) -> None:
        """Wait on every pool process's sentinel (and look for new processes every
        ``refresh_interval`` seconds) until stopped."""
        try:
            while not self._stopping.is_set():
                try:
                    self._refresh()
                    by_fd = {fd: proc for proc, fd in self._watched.values()}
                    ready = wait([self._stop_read, *by_fd], timeout=self.refresh_interval)
                    for fd in ready:
                        if fd in by_fd and not self._stopping.is_set():
                            self._exited(by_fd[fd])
                except Exception:  # never let the watch die: Celery's timer still works
                    logger.exception("jobreaper: watching the pool processes failed")
                    self._stopping.wait(self.refresh_interval)
        finally:
            for _proc, fd in self._watched.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._watched.clear()
            for fd in (self._stop_read, self._stop_write):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _refresh(self) -> None:
        """Watch processes the pool started since; forget those it no longer has."""
        current = {id(proc): proc for proc in _copy(self.processes)}
        for key in list(self._watched):
            if key not in current:
                _proc, fd = self._watched.pop(key)
                os.close(fd)
        self._done = {key: proc for key, proc in self._done.items() if key in current}
        for key, proc in current.items():
            if key in self._watched or key in self._done:
                continue
            copy = _dup_sentinel(proc)
            if copy is None:  # not started, or joined by billiard already: nothing to watch
                self._done[key] = proc
                continue
            self._watched[key] = (proc, copy)

    def _exited(self, proc: Any) -> None:
        """*proc*'s sentinel is readable: report it once it really exited."""
        key = id(proc)
        _proc, fd = self._watched.pop(key)
        os.close(fd)
        self._done[key] = proc
        pid = int(proc.pid)
        deadline = time.monotonic() + EXIT_CONFIRM_TIMEOUT
        while not self._stopping.is_set():
            popen = getattr(proc, "_popen", None)
            known = None if popen is None else getattr(popen, "returncode", None)
            if popen is None or known is not None:  # billiard reaped it (its pid may be reused)
                self.on_exit(pid, known)
                return
            code = exit_status(pid)  # the pid is this process's while it is not reaped
            if code is not None:
                self.on_exit(pid, code)
                return
            if time.monotonic() > deadline:
                logger.debug("jobreaper: pool process %d closed its sentinel but lives on", pid)
                return
            time.sleep(EXIT_CONFIRM_STEP)


def _dup_sentinel(proc: Any) -> int | None:
    """Our own copy of *proc*'s sentinel (billiard closes its own when it joins the process)."""
    popen = getattr(proc, "_popen", None)
    sentinel = None if popen is None else getattr(popen, "sentinel", None)
    if sentinel is None:
        return None
    try:
        fd = os.dup(sentinel)
    except OSError:
        return None
    if getattr(popen, "sentinel", None) != sentinel:  # closed meanwhile: the copy may be wrong
        os.close(fd)
        return None
    return fd


def _copy(processes: Callable[[], list[Any]]) -> list[Any]:
    for _ in range(100):
        try:
            return list(processes())
        except RuntimeError:  # changed while being read on the event loop: try again
            continue
    return []


def pool_processes(worker: Any) -> Callable[[], list[Any]] | None:
    """A reader of *worker*'s prefork pool processes, or ``None`` for other pools."""
    pool = getattr(getattr(worker, "pool", None), "_pool", None)
    if pool is None or not isinstance(getattr(pool, "_pool", None), list):
        return None
    if not callable(getattr(worker.pool, "maintain_pool", None)):
        return None

    def processes() -> list[Any]:
        return list(pool._pool)

    return processes


def abnormal(code: int | None) -> bool:
    """Whether an exit code means the pool process died (``None``: not known, assume so)."""
    return code not in NORMAL_EXIT_CODES
