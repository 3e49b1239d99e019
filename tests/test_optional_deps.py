"""Only the base dependencies: the package imports, and a missing extra is one clear error.

The client libraries are made unimportable in a subprocess by a directory on ``PYTHONPATH``
holding stand-in modules that raise ``ImportError`` as a missing package does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import REDIS_URL, ROOT, TESTS, worker_env

BLOCKED = ("redis", "packaging", "psycopg", "pymysql")
EXTRA_HINT = 'pip install "celery_jobreaper[redis]"'


@pytest.fixture
def blocked_path(tmp_path: Path) -> str:
    """A PYTHONPATH on which redis, packaging, psycopg and pymysql cannot be imported."""
    folder = tmp_path / "blocked"
    for name in BLOCKED:
        pkg = folder / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n"
        )
    return os.pathsep.join([str(folder), str(TESTS), str(ROOT)])


def _run(code: str, path: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_stand_ins_really_block_the_client_libraries(blocked_path: str, tmp_path: Path) -> None:
    out = _run("import redis", blocked_path, tmp_path)
    assert out.returncode != 0
    assert "No module named 'redis'" in out.stderr


def test_package_imports_and_filesystem_app_reaps_without_extras(
    blocked_path: str, tmp_path: Path
) -> None:
    code = f"""
    import sys
    from datetime import timedelta
    from celery import Celery
    from sqlalchemy import MetaData, create_engine, insert, select
    import celery_jobreaper
    from celery_jobreaper.clock import utcnow
    from jobtables import SEED_SOURCE, seed_table

    for name in {BLOCKED!r}:
        assert name not in sys.modules or sys.modules[name] is None, name
    url = "sqlite:///{tmp_path / "jobs.db"}"
    table = seed_table(MetaData())
    engine = create_engine(url)
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table).values(
            job_id="stuck", status="running", started_at=utcnow() - timedelta(days=1)))
    folder = "{tmp_path / "broker"}"
    app = Celery("fs", broker="filesystem://", set_as_current=False)
    app.conf.broker_transport_options = {{
        "data_folder_in": folder, "data_folder_out": folder, "control_folder": folder + "-ctl"}}
    app.conf.jobreaper_database_url = url
    app.conf.jobreaper_sources = [SEED_SOURCE]
    app.conf.jobreaper_ping_timeout = 0.2
    report = celery_jobreaper.reap(app)
    with engine.connect() as conn:
        status = conn.execute(select(table.c.status)).scalar_one()
    print("settled", report.settled, status)
    for name in {BLOCKED!r}:
        assert name not in sys.modules or sys.modules[name] is None, name
    """
    for sub in ("broker", "broker-ctl"):
        (tmp_path / sub).mkdir()
    out = _run(code, blocked_path, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "settled 1 failed" in out.stdout


def test_redis_app_without_redis_gets_one_clear_error(blocked_path: str, tmp_path: Path) -> None:
    code = f"""
    from celery import Celery
    import celery_jobreaper
    app = Celery("r", broker="{REDIS_URL}", set_as_current=False)
    app.conf.jobreaper_database_url = "sqlite:///{tmp_path / "jobs.db"}"
    try:
        celery_jobreaper.reap(app)
    except celery_jobreaper.ConfigurationError as error:
        print("ERROR:", error)
    else:
        raise SystemExit("no error")
    """
    out = _run(code, blocked_path, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert EXTRA_HINT in out.stdout
    assert "invalid setting broker_url" in out.stdout
    assert "Traceback" not in out.stderr


def test_redis_worker_without_redis_stops_with_the_clear_error(
    blocked_path: str, tmp_path: Path, sqlite_url: str, unique: str
) -> None:
    env = {
        **os.environ,
        **worker_env(sqlite_url, f"q-{unique}"),
        "PYTHONPATH": blocked_path,
    }
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workerapp", "worker", "-n", f"w-{unique}@t"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode != 0
    assert EXTRA_HINT in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://u@127.0.0.1/x", 'pip install "celery_jobreaper[postgres]"'),
        ("mysql+pymysql://u@127.0.0.1/x", 'pip install "celery_jobreaper[mysql]"'),
    ],
)
def test_missing_database_driver_names_the_extra(
    blocked_path: str, tmp_path: Path, url: str, expected: str
) -> None:
    code = f"""
    from celery import Celery
    import celery_jobreaper
    app = Celery("d", broker="memory://", set_as_current=False)
    app.conf.jobreaper_database_url = "{url}"
    try:
        celery_jobreaper.reap(app)
    except celery_jobreaper.ConfigurationError as error:
        print("ERROR:", error)
    """
    out = _run(code, blocked_path, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "invalid setting jobreaper_database_url" in out.stdout
    assert expected in out.stdout
