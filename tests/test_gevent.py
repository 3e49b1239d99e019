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


def _check(db_url: str, broker_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, str(TESTS / "greencheck.py"), db_url, broker_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ok 3" in done.stdout, output
    assert "Traceback" not in output, output
