"""The pool watch with real child processes (billiard's, as Celery's prefork pool makes them)."""

from __future__ import annotations

import os
import queue
import signal
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import billiard
import pytest

from celery_jobreaper import poolwatch
from celery_jobreaper.poolwatch import HubNudge, PoolWatch, exit_status

# billiard forks; a process with threads (the watch) warns about that on Python >= 3.12
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")


def _live_until_sigusr1() -> None:
    """A pool process stand-in: lives until SIGUSR1 (then exits with 0) or killed.

    SIGUSR1 stays blocked (from the fork on, see :meth:`Children.start`) and is taken with
    ``sigwait``, which returns whether it came before or during the wait. Not a Python handler
    and ``signal.pause()``: a signal that arrives after the interpreter last looked for
    pending handlers but before ``pause(2)`` sleeps is consumed by the C handler, and its
    Python handler would run only on a *next* signal -- the child lived on, its exit was never
    reported (seen once in 100 runs of this scenario beside a full test run: the child asleep
    in pause, SIGUSR1 caught and unblocked, nothing pending, 10 s after the signal).
    """
    signal.sigwait({signal.SIGUSR1})
    os._exit(0)


class StandIn(billiard.Process):  # type: ignore[misc]
    """A pool process stand-in: a billiard ``Process`` (what the watch reads), whose forked
    child runs :func:`_live_until_sigusr1` and nothing else.

    Not billiard's own ``_bootstrap``: it runs every after-fork hook registered in this
    (pytest) process first, and kombu registers one per connection pool of every Celery app
    other tests made; closing a Redis channel that was waiting in BRPOP reads the reply from
    the socket the child shares with this process -- forever. That was the sibling of the
    first test below, in full runs: blocked in ``kombu ... _brpop_read`` under
    ``_run_after_forkers``, SIGUSR1 still blocked and pending, so it never exited and its
    exit was never reported (reproduced after test_tracking, test_webhooks, test_native and
    test_late_writes in one session; faulthandler traceback of the child).
    """

    def _bootstrap(self) -> int:
        _live_until_sigusr1()
        return 1  # not reached: the child ends in os._exit


class Children:
    """Billiard processes that each live until SIGUSR1 (exit 0) or killed."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.threads_at_fork: dict[int, list[str]] = {}  # pid -> this process's threads then

    def start(self) -> Any:
        proc = StandIn(daemon=True)
        # forked with SIGUSR1 blocked: the child takes it with sigwait, whenever it was sent
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.procs.append(proc)
        self.threads_at_fork[proc.pid] = [t.name for t in threading.enumerate()]
        return proc

    def state(self, proc: Any) -> str:
        """What a failure shows of *proc*: kernel state, signal masks, where it sleeps."""
        lines = [f"pid {proc.pid}; threads here at its fork: {self.threads_at_fork[proc.pid]}"]
        for name in ("status", "wchan", "stack"):
            try:
                text = Path(f"/proc/{proc.pid}/{name}").read_text()
            except OSError as error:
                text = str(error)
            if name == "status":
                keep = ("State", "SigPnd", "ShdPnd", "SigBlk", "SigCgt", "Threads")
                text = " ".join(ln for ln in text.splitlines() if ln.split(":")[0] in keep)
            lines.append(f"{name}: {text}")
        return "\n".join(lines)

    def finish(self, proc: Any) -> None:
        """Let *proc* end normally (exit code 0)."""
        os.kill(proc.pid, signal.SIGUSR1)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=10)


@pytest.fixture
def children() -> Iterator[Children]:
    made = Children()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def reports() -> queue.Queue[tuple[int, int | None]]:
    return queue.Queue()


def _watch(children: Children, reports: queue.Queue[tuple[int, int | None]]) -> PoolWatch:
    watch = PoolWatch(
        lambda: list(children.procs),
        lambda pid, code: reports.put((pid, code)),
        refresh_interval=0.05,
    )
    watch.start()
    return watch


def test_only_the_dead_process_is_reported_and_left_for_billiard(
    children: Children, reports: queue.Queue[tuple[int, int | None]]
) -> None:
    victim, sibling = children.start(), children.start()
    watch = _watch(children, reports)
    try:
        os.kill(victim.pid, signal.SIGKILL)
        assert reports.get(timeout=30) == (victim.pid, -signal.SIGKILL)
        # WNOWAIT: the dead child is still there to be reaped, by billiard
        assert exit_status(victim.pid) == -signal.SIGKILL
        assert victim.exitcode == -signal.SIGKILL
        assert exit_status(victim.pid) is None  # reaped now: no longer our child
        # the sibling lives on and was not reported; once it ends, it is (exit code 0)
        assert sibling.exitcode is None
        children.finish(sibling)
        try:
            report = reports.get(timeout=30)
        except queue.Empty:
            raise AssertionError(f"no report of the sibling:\n{children.state(sibling)}") from None
        assert report == (sibling.pid, 0)
    finally:
        watch.stop()
        watch.join(timeout=10)
    assert reports.empty()


def test_processes_started_later_are_watched(
    children: Children, reports: queue.Queue[tuple[int, int | None]]
) -> None:
    children.start()
    watch = _watch(children, reports)
    try:
        replacement = children.start()  # as the pool replaces a process
        os.kill(replacement.pid, signal.SIGKILL)
        assert reports.get(timeout=30) == (replacement.pid, -signal.SIGKILL)
    finally:
        watch.stop()
        watch.join(timeout=10)


def test_a_process_reaped_by_billiard_first_is_reported_with_its_exit_code(
    children: Children, reports: queue.Queue[tuple[int, int | None]]
) -> None:
    proc = children.start()
    watch = PoolWatch(lambda: list(children.procs), lambda pid, code: reports.put((pid, code)))
    watch._refresh()  # the watch holds a copy of the sentinel (not started: no thread races)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.join(timeout=30) is None and proc.exitcode == -signal.SIGKILL  # billiard reaps
    watch._exited(proc)
    assert reports.get_nowait() == (proc.pid, -signal.SIGKILL)


def test_a_readable_sentinel_of_a_pid_now_alive_is_never_reported(
    children: Children, reports: queue.Queue[tuple[int, int | None]], monkeypatch: Any
) -> None:
    """Pid reuse: a sentinel copy says "exited", but the pid is a live process's (here: a
    live child's, with no exit code known): nothing is reported, the watch gives up."""
    dead, alive = children.start(), children.start()
    os.kill(dead.pid, signal.SIGKILL)
    dead.join(timeout=30)
    read, write = os.pipe()
    os.close(write)  # a sentinel whose process is gone: readable
    stand_in = types.SimpleNamespace(
        pid=alive.pid, _popen=types.SimpleNamespace(sentinel=read, returncode=None)
    )
    watch = PoolWatch(lambda: [stand_in], lambda pid, code: reports.put((pid, code)))
    watch._refresh()
    monkeypatch.setattr(poolwatch, "EXIT_CONFIRM_TIMEOUT", 0.2)
    watch._exited(stand_in)
    os.close(read)
    assert reports.empty()
    assert alive.exitcode is None


def test_hub_nudge_runs_maintain_pool_on_the_loop_then_asks_for_a_reap() -> None:
    calls: list[str] = []
    readers: dict[int, Any] = {}
    hub = types.SimpleNamespace(add_reader=readers.__setitem__)
    nudge = HubNudge(lambda: calls.append("maintain_pool"), lambda: calls.append("reap"))
    try:
        nudge.register(hub)
        (fd,) = readers
        thread = threading.Thread(target=nudge.nudge, args=(True,))
        thread.start()
        thread.join()
        readers[fd]()  # what the event loop does when the pipe is readable
        assert calls == ["maintain_pool", "reap"]
        nudge.nudge(False)  # a normal exit: maintain_pool only
        readers[fd]()
        assert calls == ["maintain_pool", "reap", "maintain_pool"]
    finally:
        nudge.close()
