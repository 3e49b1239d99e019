"""Shared fixtures: a fresh database per test (PostgreSQL, MariaDB, SQLite) and real workers."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from support import MYSQL_ADMIN, PG_ADMIN, REDIS_URL, ROOT, TESTS, WorkerProcess


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


@pytest.fixture
def unique() -> str:
    """A short unique token for queue and node names."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def prefix(unique: str) -> Iterator[str]:
    """A Redis key prefix (kombu's global_keyprefix) of this test's own; its keys go after."""
    value = f"jrk-{unique}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{value}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
