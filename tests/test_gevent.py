"""gevent: jobreaper's loops run in real threads (``celery_jobreaper.native``), and the
database and broker work there while the hub's thread uses them too (real services)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import AMQP_URL, REDIS_URL, ROOT, TESTS


def test_loop_thread_uses_database_and_broker_beside_the_hub(db_url: str) -> None:
    """psycopg 3, PyMySQL and SQLite, and Redis broadcasts: the hub's thread made pooled
    connections first (its sockets wait on its own hub); the real thread must not reuse them."""
    _check(db_url, REDIS_URL)


@pytest.mark.xdist_group("rabbitmq")  # one vhost: its broadcasts reach every worker on it
def test_loop_thread_broadcasts_on_rabbitmq_beside_the_hub(sqlite_url: str) -> None:
    _check(sqlite_url, AMQP_URL)


def test_loop_thread_gets_logging_locks_while_a_task_never_yields() -> None:
    """A busy task blocks the hub's thread; a loop thread waits for logging's module lock and
    for a handler's lock, held by the other loop thread or by the task itself (each time until
    it is seen waiting): it must get them. With gevent's locks it waited forever for a wake-up
    from a hub that does not run (the busy worker's heartbeat stopped: DESIGN §2.1)."""
    done = _script("greenlogcheck.py")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ok" in done.stdout, output
    assert "Traceback" not in output, output


def _check(db_url: str, broker_url: str) -> None:
    done = _script("greencheck.py", db_url, broker_url)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ok 3" in done.stdout, output
    assert "Traceback" not in output, output


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, str(TESTS / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
