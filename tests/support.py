"""Helpers shared by the tests: service addresses, real worker processes, polling."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from jobtables import SEED_SOURCE

PG_ADMIN = os.environ.get("JR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN = os.environ.get("JR_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/")


def _redis_url(setting: str, worker: str) -> str:
    """This test process's Redis: a database of its own under pytest-xdist.

    Broadcasts on one Redis database reach every worker listening on it (a reap with jobs
    without owner asks *every* worker whether it is live), so two test processes never share
    one. *setting* (JR_TEST_REDIS) is one URL or a comma-separated list: process ``gwK``
    takes the K-th entry, or, past the list's end, the first URL's database index plus K.
    """
    urls = [u.strip() for u in setting.split(",") if u.strip()]
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    if index < len(urls):
        return urls[index]
    base, _, db = urls[0].rpartition("/")
    return f"{base}/{int(db or 0) + index}"


REDIS_URL = _redis_url(
    os.environ.get("JR_TEST_REDIS", "redis://127.0.0.1:6379/10"),
    os.environ.get("PYTEST_XDIST_WORKER", ""),
)
AMQP_URL = os.environ.get("JR_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
TESTS = Path(__file__).parent
ROOT = TESTS.parent


class WorkerProcess:
    """A real ``celery worker`` subprocess in its own process group, logging to a file."""

    def __init__(self, name: str, log: Path, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.log = log
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, pattern: str, timeout: float = 60.0, count: int = 1) -> str:
        """Wait until *pattern* (a regex) appears *count* times in the log; return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if len(re.findall(pattern, out)) >= count:
                return out
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker {self.name} exited ({self.proc.returncode}) before {pattern!r}:\n{out}"
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {pattern!r} in {self.name}:\n{self.output()}")

    def signal(self, sig: int) -> None:
        """Send *sig* to the worker's whole process group (main process and pool children)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group and reap the main process."""
        with contextlib.suppress(ProcessLookupError):
            self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM to the main process), then wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll *predicate* until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def make_app(url: str, **conf: Any) -> Celery:
    app = Celery("t", broker=REDIS_URL, set_as_current=False)
    app.conf.jobreaper_database_url = url
    app.conf.jobreaper_track_tasks = False
    app.conf.jobreaper_ping_timeout = 0.2
    app.conf.jobreaper_sources = [SEED_SOURCE]
    for key, value in conf.items():
        app.conf[f"jobreaper_{key}"] = value
    return app


def worker_env(
    db_url: str, queue: str, *, broker: str = REDIS_URL, **settings: Any
) -> dict[str, str]:
    """Environment for a ``workerapp`` worker: broker, database, queue, ``jobreaper_*`` settings."""
    return {
        "JR_BROKER_URL": broker,
        "JR_DATABASE_URL": db_url,
        "JR_QUEUE": queue,
        "JR_SETTINGS": json.dumps(settings),
    }
