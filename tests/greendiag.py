"""Diagnosis of ``-P gevent`` test workers (``workerapp`` imports it when asked; never in CI).

JR_DEBUG_DUMP=<folder>: a real thread watches jobreaper's loop threads; when one stays 3 s at
the same place outside its idle wait (its main greenlet's frames, also while it waits in its
own hub, where a thread's own stack shows only ``hub.py run``), it writes every thread's and
greenlet's stack and every gevent lock, event or semaphore with waiters (and what refers to
it) to ``stall-<pid>.txt``.

JR_LOCK_AUDIT=<folder> (with gevent's pure-Python mode, ``PURE_PYTHON=1``): records which OS
threads take or wait for each gevent semaphore, lock, event or async result; every 2 s writes
the ones used by more than one OS thread, with the stack of their first use outside the main
thread, to ``audit-<pid>.txt``. In the busy-worker scenario of ``test_live_workers.py`` it
found one blocking gevent lock that both loop threads and the hub's thread take: ``logging``'s
module lock (``isEnabledFor`` cache misses in SQLAlchemy; see ``celery_jobreaper.loglocks``);
besides, SQLAlchemy's compiled-cache lock (only ever tried without blocking) and the reaper's
run lock (the hub's thread takes it for the startup reap only).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def install() -> None:
    """Start what the environment asks for (only in a monkey-patched worker)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return
    if os.environ.get("JR_DEBUG_DUMP"):
        _stall_watch(monkey, os.environ["JR_DEBUG_DUMP"])
    if os.environ.get("JR_LOCK_AUDIT"):
        _lock_audit(monkey, os.environ["JR_LOCK_AUDIT"])


def _in_hub(frame: Any) -> bool:
    return frame.f_code.co_name == "run" and frame.f_code.co_filename.endswith("hub.py")


def _describe(me: int) -> str:
    import greenlet
    from gevent._abstract_linkable import AbstractLinkable

    out = []
    for ident, frame in sys._current_frames().items():
        if ident != me:
            out.append(f"=== thread {ident:#x}\n" + "".join(traceback.format_stack(frame)))
    objs = gc.get_objects()
    for g in objs:
        if isinstance(g, greenlet.greenlet) and g and g.gr_frame is not None:
            stack = "".join(traceback.format_stack(g.gr_frame))
            out.append(f"--- greenlet {g!r:.200}\n{stack}")
    for o in objs:
        if isinstance(o, AbstractLinkable):
            try:
                links, locked = o.linkcount(), getattr(o, "locked", lambda: None)()
            except Exception as error:
                links, locked = repr(error), None
            if links or locked:
                refs = [f"{type(r).__name__}:{r!r:.150}" for r in gc.get_referrers(o)[:6]]
                out.append(
                    f"*** linkable {o!r:.200} hub={o.hub!r:.120} links={links} "
                    f"locked={locked}\n    referrers: {refs}"
                )
    return "\n".join(out)


def _stall_watch(monkey: Any, folder: str) -> None:
    from gevent.hub import Hub

    sleep = monkey.get_original("time", "sleep")
    get_ident = monkey.get_original("_thread", "get_ident")
    main_ident = get_ident()  # workerapp is imported in the main thread

    def stack_of(ident: int, frame: Any, hubs: dict[int, Any]) -> tuple[Any, ...]:
        """The frames of the thread's main greenlet (the ones it left for its hub, if it
        waits there)."""
        if _in_hub(frame):
            frame = getattr(getattr(hubs.get(ident), "parent", None), "gr_frame", None)
        out = []
        while frame is not None:
            out.append((frame.f_code.co_filename, frame.f_code.co_name, frame.f_lineno))
            frame = frame.f_back
        return tuple(out)

    def watch() -> None:
        me = get_ident()
        seen: dict[int, tuple[Any, float]] = {}
        hubs: dict[int, Any] = {}
        last_scan = 0.0
        while True:
            sleep(0.25)
            now = time.monotonic()
            if now - last_scan > 2.0:
                hubs = {h.thread_ident: h for h in gc.get_objects() if isinstance(h, Hub)}
                last_scan = now
            for ident, frame in sys._current_frames().items():
                if ident in (main_ident, me):
                    continue
                stack = stack_of(ident, frame, hubs)
                names = {(f.rsplit("/", 1)[-1], n) for f, n, _ in stack}
                if not any(f == "native.py" for f, _ in names) or ("native.py", "_wait") in names:
                    seen.pop(ident, None)  # not a loop thread, or idle between two calls
                    continue
                old = seen.get(ident)
                if old is None or old[0] != stack:
                    seen[ident] = (stack, now)
                elif now - old[1] > 3.0:
                    text = f"{time.strftime('%H:%M:%S')} stalled: {ident:#x}\n"
                    try:
                        text += _describe(me)
                    except Exception as error:  # racing with the threads it looks at
                        text += f"failed: {error!r}"
                    Path(folder, f"stall-{os.getpid()}.txt").write_text(text)
                    return

    monkey.get_original("_thread", "start_new_thread")(watch, ())


def _lock_audit(monkey: Any, folder: str) -> None:
    from gevent import _semaphore, event

    sleep = monkey.get_original("time", "sleep")
    get_ident = monkey.get_original("_thread", "get_ident")
    main_ident = get_ident()
    users: dict[int, tuple[Any, set[int], list[str]]] = {}

    def record(self: Any) -> None:
        me = get_ident()
        entry = users.get(id(self))
        if entry is None or entry[0] is not self:
            entry = users[id(self)] = (self, set(), [])
        if me not in entry[1]:
            entry[1].add(me)
            if me != main_ident:
                stack = "".join(traceback.format_stack(limit=14))
                entry[2].append(f"thread {me:#x}:\n{stack}")

    def audited(original: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            record(self)
            return original(self, *args, **kwargs)

        return call

    _semaphore.Semaphore.acquire = audited(_semaphore.Semaphore.acquire)
    for cls, name in (
        (event.Event, "wait"),
        (event.AsyncResult, "get"),
        (event.AsyncResult, "wait"),
    ):
        setattr(cls, name, audited(getattr(cls, name)))

    def report() -> None:
        while True:
            sleep(2.0)
            out = []
            for lock, idents, stacks in list(users.values()):
                if len(idents) > 1:
                    out.append(
                        f"*** {lock!r:.120} threads={[hex(i) for i in idents]} "
                        f"main={main_ident:#x}\n" + "\n".join(stacks)
                    )
            Path(folder, f"audit-{os.getpid()}.txt").write_text("\n".join(out))

    monkey.get_original("_thread", "start_new_thread")(report, ())
