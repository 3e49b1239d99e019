"""Helpers shared by the benchmarks: throwaway PostgreSQL databases, medians, process groups."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, text

PG_ADMIN = os.environ.get("JR_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("JR_BENCH_REDIS", "redis://127.0.0.1:6379/14")


@contextlib.contextmanager
def throwaway_database(prefix: str = "jrbench") -> Iterator[str]:
    """Create a fresh PostgreSQL database, yield its URL, and drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def median(values: list[float]) -> float:
    """The median of *values*."""
    return statistics.median(values)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group led by *proc* (started with ``start_new_session=True``).

    Only while *proc* is not yet reaped: its pid (and so the group id) cannot have been reused.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Warm shutdown (SIGTERM to the worker's main process), then SIGKILL its group if needed."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    kill_group(proc)
