"""Webhooks: each run that settled something is posted as JSON, never blocking or failing a reap.

A real local HTTP server receives the posts: from ``reap()``, from a real worker's startup reap,
through retries, timeouts and refusals.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from jobtables import SEED_SOURCE, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import make_app, wait_until, worker_env

import celery_jobreaper
from celery_jobreaper import ConfigurationError, signals
from celery_jobreaper.database import Database
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.report import Report
from celery_jobreaper.settings import Settings
from celery_jobreaper.webhooks import Webhooks


class Receiver:
    """A local HTTP server that records every POST and answers with scripted status codes."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.statuses: list[int] = []  #: answers to give, in order; 200 once used up
        self.hold = threading.Event()  #: while clear (and ``holding``), requests wait on it
        self.holding = False
        self.entered = threading.Event()  #: a request arrived
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append(
                    {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                )
                receiver.entered.set()
                if receiver.holding:
                    receiver.hold.wait(30)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _jobreaper_logs(caplog: pytest.LogCaptureFixture) -> None:
    """jobreaper's warnings are captured whatever level an earlier test left its logger at."""
    caplog.set_level(logging.INFO, logger="celery_jobreaper")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _report(settled: int = 2, *, dry_run: bool = False) -> Report:
    return Report(
        trigger="manual",
        dry_run=dry_run,
        started_at=datetime(2026, 12, 2, 10, 0, 0),
        node="w1@h",
        run_id=7,
        settled=settled,
    )


def _hooks(url: str, **kw: Any) -> Webhooks:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retries", 0)
    kw.setdefault("first_pause", 0.01)
    return Webhooks([url], **kw)


def test_a_report_that_settled_is_posted_as_json_with_the_configured_headers(
    receiver: Receiver,
) -> None:
    hooks = _hooks(receiver.url, headers={"Authorization": "Bearer s3cret"})
    hooks.notify(_report(2))
    hooks.close()
    assert len(receiver.posts) == 1
    post = receiver.posts[0]
    assert post["path"] == "/hook"
    assert post["headers"]["Content-Type"] == "application/json"
    assert post["headers"]["Authorization"] == "Bearer s3cret"
    assert post["json"]["event"] == "jobreaper.reap"
    report = post["json"]["report"]
    assert (report["settled"], report["node"], report["run_id"]) == (2, "w1@h", 7)
    assert report["started_at"] == "2026-12-02T10:00:00Z"


def test_runs_that_settled_nothing_and_dry_runs_are_not_posted(receiver: Receiver) -> None:
    hooks = _hooks(receiver.url)
    hooks.notify(_report(0))
    hooks.notify(_report(3, dry_run=True))
    hooks.notify(_report(1))  # the only one sent
    hooks.close()
    assert [p["json"]["report"]["settled"] for p in receiver.posts] == [1]


def test_overload_answers_are_retried_until_delivered(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [503, 500]
    hooks = _hooks(receiver.url, retries=3)
    hooks.notify(_report())
    hooks.close()
    assert len(receiver.posts) == 3  # 503, 500, then 200
    assert caplog.text.count("jobreaper: webhook http://127.0.0.1") == 2  # two retry warnings
    assert "not delivered" not in caplog.text


def test_a_receiver_that_keeps_failing_is_given_up_after_the_retries_and_logged(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500] * 10
    hooks = _hooks(receiver.url, retries=2)
    hooks.notify(_report())
    hooks.close()
    assert len(receiver.posts) == 3
    assert "not delivered after 3 tries: HTTP 500" in caplog.text


def test_a_refusal_is_not_retried(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [404]
    hooks = _hooks(receiver.url, retries=3)
    hooks.notify(_report())
    hooks.close()
    assert len(receiver.posts) == 1
    assert "not delivered after 1 tries: HTTP 404" in caplog.text


def test_a_receiver_that_never_answers_times_out(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.holding = True  # every request hangs until the fixture ends
    hooks = _hooks(receiver.url, timeout=0.3, retries=1)
    hooks.notify(_report())
    hooks.close()
    assert len(receiver.posts) == 2
    assert "not delivered after 2 tries" in caplog.text and "timed out" in caplog.text


def test_nothing_listening_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    hooks = _hooks("http://127.0.0.1:9/hook", retries=1)  # the discard port: refused
    hooks.notify(_report())
    hooks.close()
    assert "jobreaper: webhook http://127.0.0.1:9/hook not delivered after 2 tries" in caplog.text


def test_credentials_in_the_url_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    hooks = _hooks("http://user:pa55word@127.0.0.1:9/hook")
    hooks.notify(_report())
    hooks.close()
    assert "not delivered" in caplog.text and "pa55word" not in caplog.text


def test_reap_returns_while_the_receiver_still_holds_the_post_and_a_raising_signal_receiver_is_harmless(  # noqa: E501
    sqlite_url: str,
    engine_for: Callable[[str], Engine],
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reap is not held up by its webhook, nor stopped by a signal receiver that raises."""
    engine = engine_for(sqlite_url)
    table = create_seed(engine, [{"job_id": "stuck"}])
    receiver.holding = True

    def broken(**_: Any) -> None:
        raise RuntimeError("a broken receiver")

    signals.jobs_settled.connect(broken)
    signals.reap_finished.connect(broken)
    try:
        settings = Settings.from_app(make_app(sqlite_url))
        reaper = Reaper(
            make_app(sqlite_url),
            settings,
            Database.from_settings(settings),
            webhooks=_hooks(receiver.url, timeout=30),
        )
        report = reaper.run("manual")
        # run() returned although the receiver has not answered (it waits on `hold`)
        assert report.settled == 1 and report.ok
        assert receiver.entered.wait(10) and not receiver.hold.is_set()
        receiver.hold.set()
        assert reaper.webhooks is not None
        reaper.webhooks.close()
        reaper.db.dispose()
    finally:
        signals.jobs_settled.disconnect(broken)
        signals.reap_finished.disconnect(broken)
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalar_one() == "failed"
    assert "a broken receiver" in caplog.text
    assert receiver.posts[0]["json"]["report"]["settled"] == 1


def test_reap_posts_its_report_before_returning(
    db_url: str, engine_for: Callable[[str], Engine], receiver: Receiver
) -> None:
    create_seed(engine_for(db_url), [{"job_id": "a"}, {"job_id": "b"}])
    app = make_app(db_url, webhooks=receiver.url)
    report = celery_jobreaper.reap(app)
    assert report.settled == 2
    assert len(receiver.posts) == 1  # reap() delivers before it returns (a one-shot process)
    posted = receiver.posts[0]["json"]["report"]
    assert (posted["settled"], posted["run_id"], posted["trigger"]) == (2, report.run_id, "manual")
    celery_jobreaper.reap(app)  # nothing left: nothing posted
    assert len(receiver.posts) == 1


@pytest.mark.parametrize(
    ("key", "value", "needs"),
    [
        ("webhooks", "ftp://example.com/x", "http:// or https://"),
        ("webhooks", ["http://ok.example/x", "file:///etc/passwd"], "http:// or https://"),
        ("webhooks", 3, "a URL or a list"),
        ("webhook_timeout", 0, "positive number of seconds"),
        ("webhook_retries", -1, "non-negative integer"),
        ("webhook_headers", {"X-Token": 5}, "mapping of header names"),
    ],
)
def test_bad_webhook_settings_name_the_key(key: str, value: Any, needs: str) -> None:
    app = make_app("sqlite://", **{key: value})
    with pytest.raises(ConfigurationError, match=f"jobreaper_{key}.*{needs}"):
        Settings.from_app(app)


@pytest.mark.parametrize("trigger", ["startup", "periodic"])
@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_a_real_workers_reap_is_posted(
    pool: str,
    trigger: str,
    pg_url: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., Any],
    receiver: Receiver,
    unique: str,
) -> None:
    """A ghost there at start is settled by the startup reap; one that appears later by a
    periodic reap, in jobreaper's loop thread (a real OS thread under gevent)."""
    engine = engine_for(pg_url)
    table = create_seed(engine, [{"job_id": "ghost"}] if trigger == "startup" else [])
    name = f"hook-{unique}@h"
    env = worker_env(pg_url, f"q-{unique}", sources=[SEED_SOURCE], webhooks=[receiver.url])
    worker = start_worker(name, env=env, pool=pool)
    worker.wait_for(r"ready\.")
    if trigger == "periodic":  # this worker holds no task and no other runs: a ghost
        with engine.begin() as conn:
            conn.execute(table.insert().values(job_id="ghost", status="running"))
    wait_until(lambda: receiver.posts, timeout=30, what="the webhook post")
    posted = receiver.posts[0]["json"]["report"]
    assert (posted["trigger"], posted["node"], posted["settled"]) == (trigger, name, 1)
    assert worker.stop() == 0
