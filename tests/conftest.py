"""Shared fixtures: a fresh database per test (PostgreSQL, MariaDB, SQLite) and real workers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

PG_ADMIN = os.environ.get("JR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN = os.environ.get("JR_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/")
REDIS_URL = os.environ.get("JR_TEST_REDIS", "redis://127.0.0.1:6379/10")
AMQP_URL = os.environ.get("JR_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _fresh_name() -> str:
    return f"jrt_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a brand-new PostgreSQL database, dropped afterwards."""
    name = _fresh_name()
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def mysql_url() -> Iterator[str]:
    """URL of a brand-new MariaDB database, dropped afterwards."""
    name = _fresh_name()
    admin = create_engine(MYSQL_ADMIN)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    try:
        yield MYSQL_ADMIN.rstrip("/") + f"/{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a new SQLite file."""
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture(params=["postgresql", "mariadb", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test runs once per real database."""
    fixture = {"postgresql": "pg_url", "mariadb": "mysql_url", "sqlite": "sqlite_url"}
    return str(request.getfixturevalue(fixture[request.param]))


@pytest.fixture
def engine_for() -> Iterator[Callable[[str], Engine]]:
    """Make engines that are disposed at teardown."""
    made: list[Engine] = []

    def make(url: str) -> Engine:
        engine = create_engine(url)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


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


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real workers; every one still running is SIGKILLed (by process group) at teardown."""
    started: list[WorkerProcess] = []

    def start(
        name: str,
        *,
        env: dict[str, str],
        concurrency: int = 1,
        pool: str = "prefork",
        args: tuple[str, ...] = (),
        app: str = "workerapp",
    ) -> WorkerProcess:
        log = tmp_path / f"{name.replace('@', '_')}-{len(started)}.log"
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
            "PYTHONUNBUFFERED": "1",
            "JR_SIGNAL_DIR": str(tmp_path),
            **env,
        }
        full_env.pop("PYTHONWARNINGS", None)
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-n",
            name,
            "-c",
            str(concurrency),
            "-P",
            pool,
            "-l",
            "info",
            "--without-gossip",
            "--without-mingle",
            *args,
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                start_new_session=True,
            )
        worker = WorkerProcess(name, log, proc)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll *predicate* until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


@pytest.fixture
def unique() -> str:
    """A short unique token for queue and node names."""
    return uuid.uuid4().hex[:10]
