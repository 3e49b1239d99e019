"""The loop thread of ``celery_jobreaper.native`` without gevent (prefork, solo, threads)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from celery_jobreaper import native


def test_loop_runs_until_stopped_and_survives_errors(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    seen = threading.Event()
    where: list[bool] = []

    def fn() -> None:
        calls.append(threading.current_thread().name)
        where.append(loop.is_current())
        if len(calls) in (1, 2):
            raise RuntimeError("boom")
        if len(calls) == 4:
            seen.set()

    loop = native.Loop("jobreaper-test", 0.001, fn)
    assert not loop.is_alive()
    with caplog.at_level(logging.INFO, logger="celery_jobreaper"):
        loop.start()
        assert seen.wait(30)
        assert loop.is_alive() and not loop.is_current()
        loop.stopping.set()
        loop.stopping.set()  # twice: no error
        assert loop.join(30)
    assert not loop.is_alive() and loop.stopping.is_set()
    assert set(calls) == {"jobreaper-test"} and all(where)
    messages = [(r.getMessage(), bool(r.exc_info)) for r in caplog.records]
    assert messages[:3] == [
        ("jobreaper: jobreaper-test failed; retrying in 0.001 s", True),
        ("jobreaper: jobreaper-test failed again (RuntimeError: boom); retrying in 0.001 s", False),
        ("jobreaper: jobreaper-test works again", False),
    ]


def test_stop_flag_wait_times_out_then_stays_open() -> None:
    flag = native.StopFlag()
    assert flag.wait(0.01) is False and not flag.is_set()
    flag.set()
    assert flag.wait(0) is True and flag.wait(10) is True


def test_without_gevent_threads_are_plain() -> None:
    assert not native.patched()
    assert native.thread_ident() == threading.get_ident()


def test_without_gevent_every_thread_uses_the_one_engine(sqlite_url: str) -> None:
    from sqlalchemy import create_engine

    from celery_jobreaper.database import Database

    db = Database(create_engine(sqlite_url), owned=True)
    seen: list[object] = []
    other = threading.Thread(target=lambda: seen.append(db.engine))
    other.start()
    other.join()
    assert seen == [db.engine]
    db.dispose()


def test_loop_kick_and_kick_later_call_now_and_after_the_delay_then_stop_at_once() -> None:
    calls: list[float] = []
    called = threading.Event()

    def fn() -> None:
        calls.append(time.monotonic())
        called.set()

    loop = native.Loop("kicked", 3600.0, fn)  # its period never comes in this test
    loop.start()
    try:
        loop.kick()
        assert called.wait(10) and len(calls) == 1
        called.clear()
        asked = time.monotonic()
        loop.kick_later(0.3)
        assert called.wait(10) and len(calls) == 2
        assert calls[1] >= asked + 0.3  # not before the delay
    finally:
        loop.stop()
    assert loop.join(10)  # stop wakes the thread: no wait for the hour-long period
