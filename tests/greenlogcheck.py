"""Run as a script: under gevent's monkey-patching, while the hub's thread is busy in code that
never yields, a jobreaper loop thread waits for logging's locks (``test_gevent.py``).

Usage: ``python greenlogcheck.py``; prints ``ok`` and exits 0 when the waiting thread got
through every time, exits 1 (``stalled: ...``) when it still waits after ``DEADLINE`` seconds.

Four cases, each made certain rather than left to chance: the holder (the other loop thread,
or the busy hub's thread itself) takes the lock (``logging``'s module lock, or a handler's lock
through a log line whose ``emit`` runs with it held) and keeps it until the waiting loop thread
is seen blocked on it; then it lets go. With gevent's locks the waiter was woken by the
holder's hub (a finished thread's, or the busy one's): never.
"""

from gevent import monkey

monkey.patch_all()

import io  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from celery_jobreaper import native  # noqa: E402

#: Seconds the main thread spins before it calls a thread stalled (a hang, not a measurement).
DEADLINE = 20.0

#: The original ``time.sleep``: the loop threads here wait without their hubs.
sleep = monkey.get_original("time", "sleep")


class Side:
    """One real thread of :func:`native.start_thread` running *fn* once, with a gevent hub of
    its own (as jobreaper's loop threads have once they used the database)."""

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.name = name
        self.fn = fn
        self.ident: int | None = None
        self.started = False
        self.done = False

    def start(self) -> Any:
        def target() -> None:
            self.ident = native.thread_ident()
            gevent.get_hub()
            self.started = True
            self.fn()
            self.done = True

        return native.start_thread(self.name, target)

    def blocked(self) -> bool:
        """Whether the thread waits for a lock: its innermost frame is a lock's ``acquire``
        (an OS lock) or a gevent hub's ``run`` (a gevent lock), twice 50 ms apart."""
        for _ in range(2):
            frame = sys._current_frames().get(self.ident) if self.ident is not None else None
            if frame is None:
                return False
            code = frame.f_code
            if not (
                code.co_name == "acquire"
                or (code.co_name == "run" and code.co_filename.endswith("hub.py"))
            ):
                return False
            sleep(0.05)
        return True


class HoldingHandler(logging.Handler):
    """A handler whose ``emit`` of the message ``hold`` (run with the handler's lock held)
    returns only once :attr:`waiter` is blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.waiter: Side | None = None
        self.holding = False
        self.out = io.StringIO()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "hold" and self.waiter is not None:
            self.holding = True
            until_blocked(self.waiter)
        self.out.write(record.getMessage() + "\n")


def until_blocked(side: Side) -> None:
    while not side.blocked():
        sleep(0.001)


def run_case(lock: str, holder_kind: str, handler: HoldingHandler, log: logging.Logger) -> bool:
    """The holder (the other loop thread, or the busy hub's thread) holds *lock* until a loop
    thread waits for it, then lets go (and, in the hub's thread, goes on without yielding);
    True if the waiting thread got through."""
    handler.holding = False

    def hold() -> None:
        while not waiter.started:
            sleep(0.001)
        if lock == "module lock":
            with logging._lock:  # type: ignore[attr-defined]
                handler.holding = True
                until_blocked(waiter)
        else:
            log.info("hold")

    def wait() -> None:
        while not handler.holding:
            sleep(0.001)
        if lock == "module lock":
            logging.getLogger(f"greenlogcheck.{holder_kind}")  # takes logging's module lock
        else:
            log.info("waiter")  # takes the handler's lock

    waiter = Side("waiter", wait)
    handler.waiter = waiter
    waiter.start()
    if holder_kind == "loop thread":
        holder = Side("holder", hold)
        holder.start()
    else:
        hold()  # in the hub's thread: the busy task holds the lock
    deadline = time.monotonic() + DEADLINE
    while not waiter.done and time.monotonic() < deadline:
        pass  # the hub's thread never yields, like a CPU-bound task
    handler.waiter = None
    if not waiter.done:
        print(f"stalled: a loop thread waiting for the {lock} held by the {holder_kind}")
    return waiter.done


def main() -> int:
    handler = HoldingHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    log = logging.getLogger("greenlogcheck")
    gevent.sleep(0)  # the main thread's hub runs, as in a Celery worker
    log.info("first")
    results = [
        run_case(lock, holder, handler, log)
        for holder in ("loop thread", "hub's thread")
        for lock in ("module lock", "handler lock")
    ]
    if not all(results):
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
