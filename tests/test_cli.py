"""``celery -A app jobreaper …`` commands as real subprocesses: output, JSON, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, ROOT, TESTS

from celery_jobreaper.cli import EXIT_DECLINED, EXIT_FAILED, EXIT_OK, EXIT_USAGE


def jobreaper(
    db_url: str, *args: str, settings: dict[str, Any] | None = None, stdin: Any = None
) -> subprocess.CompletedProcess[str]:
    """``celery -A workerapp jobreaper *args`` against *db_url* (the seed's table as source)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        "JR_BROKER_URL": REDIS_URL,
        "JR_DATABASE_URL": db_url,
        "JR_SETTINGS": json.dumps(
            {"sources": [SEED_SOURCE], "ping_timeout": 0.2, **(settings or {})}
        ),
    }
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workerapp", "jobreaper", *args],
        env=env,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_plan_status_reap_history_as_json_on_a_seed_table(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg_url)
    table = create_seed(
        engine,
        [
            {"job_id": "scan_library_123abc"},
            {"job_id": "identify_456def", "status": "scheduled", "started_at": ago(hours=2)},
            {"job_id": "done", "status": "completed", "completed_at": ago(hours=1)},
        ],
    )
    planned = _json(jobreaper(pg_url, "plan", "--json"))
    assert (planned["would_settle"], planned["settled"], planned["dry_run"]) == (2, 0, True)
    assert {p["job_id"] for p in planned["planned"]} == {"scan_library_123abc", "identify_456def"}

    status = _json(jobreaper(pg_url, "status", "--json"))
    (seed,) = [s for s in status["sources"] if s["source"] == "system_jobs"]
    assert seed["stale"] == 2
    assert seed["oldest_started_at"] < status["now"]  # the day-old job, as ISO text
    assert status["runs"][0]["dry_run"] is True and status["missing_tables"] == {}

    reaped = _json(jobreaper(pg_url, "reap", "--json"))  # stdin is not a terminal: no question
    assert reaped["settled"] == 2 and reaped["error"] is None
    with engine.connect() as conn:
        assert {r.job_id: r.status for r in conn.execute(select(table))} == {
            "scan_library_123abc": "failed",
            "identify_456def": "failed",
            "done": "completed",
        }

    events = _json(jobreaper(pg_url, "history", "--json", "--job", "scan_library_123abc"))
    assert len(events) == 1
    event = events[0]
    assert (event["action"], event["previous_status"], event["new_status"]) == (
        "settled",
        "running",
        "failed",
    )
    assert event["run_id"] == reaped["run_id"] and event["trigger"] == "manual"
    assert "was running for 1 day" in event["reason"] or "running" in event["reason"]
    assert _json(jobreaper(pg_url, "history", "--json", "--since", "1h", "--source", "nope")) == []
    runs = _json(jobreaper(pg_url, "history", "--runs", "--json"))
    assert [r["settled"] for r in runs] == [2, 2]  # the reap, then the plan (would settle 2)
    assert [r["dry_run"] for r in runs] == [False, True]


def test_text_output_is_aligned_tables(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    create_seed(engine_for(sqlite_url), [{"job_id": "a-job"}])
    jobreaper(sqlite_url, "reap")
    out = jobreaper(sqlite_url, "history")
    assert out.returncode == EXIT_OK, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[:3] == ["at", "(UTC)", "run"]
    assert header.index("source") == row.index("system_jobs")  # columns line up
    assert "a-job" in row and "running -> failed" in row
    status = jobreaper(sqlite_url, "status")
    assert status.returncode == EXIT_OK, status.stderr
    assert "stale candidates" in status.stdout and "system_jobs" in status.stdout


def test_reap_on_a_terminal_asks_before_changing_more_than_a_handful(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    table = create_seed(engine, [{"job_id": f"job-{i}"} for i in range(6)])
    primary, secondary = os.openpty()  # stdin is a terminal
    try:
        os.write(primary, b"n\n")
        declined = jobreaper(sqlite_url, "reap", stdin=secondary)
        assert declined.returncode == EXIT_DECLINED, declined.stdout + declined.stderr
        assert "Settle these 6 jobs now?" in declined.stderr
        assert "job-5" in declined.stderr  # the jobs are listed before the question
        with engine.connect() as conn:
            assert {r.status for r in conn.execute(select(table))} == {"running"}
        os.write(primary, b"y\n")
        agreed = jobreaper(sqlite_url, "reap", stdin=secondary)
        assert agreed.returncode == EXIT_OK, agreed.stdout + agreed.stderr
        assert "settled 6 of 6" in agreed.stdout
    finally:
        os.close(primary)
        os.close(secondary)
    with engine.connect() as conn:
        assert {r.status for r in conn.execute(select(table))} == {"failed"}


def test_yes_skips_the_question_on_a_terminal(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    create_seed(engine_for(sqlite_url), [{"job_id": f"job-{i}"} for i in range(6)])
    primary, secondary = os.openpty()
    try:
        result = jobreaper(sqlite_url, "reap", "--yes", "--json", stdin=secondary)
    finally:
        os.close(primary)
        os.close(secondary)
    assert _json(result)["settled"] == 6


@pytest.mark.parametrize("command", ["plan", "reap", "status", "history"])
def test_invalid_configuration_exits_2_naming_the_key(sqlite_url: str, command: str) -> None:
    result = jobreaper(sqlite_url, command, settings={"heartbeat_interval": -1})
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "jobreaper_heartbeat_interval" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_time_is_a_usage_error(sqlite_url: str) -> None:
    result = jobreaper(sqlite_url, "history", "--since", "yesterday")
    assert result.returncode == EXIT_USAGE
    assert "neither an ISO 8601 time nor an age" in result.stderr


@pytest.mark.parametrize("command", ["status", "history"])
def test_unreachable_database_exits_1_in_one_line(command: str) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:9/none"  # nothing listens on port 9
    result = jobreaper(url, command, settings={"connect_timeout": 1})
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    assert result.stderr.startswith("jobreaper: ") and "Traceback" not in result.stderr


def test_a_failed_reap_exits_1(sqlite_url: str) -> None:
    result = jobreaper(
        "postgresql+psycopg://postgres@127.0.0.1:9/none",
        "reap",
        "--json",
        settings={"connect_timeout": 1},
    )
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    assert "jobreaper: the reap failed: OperationalError: " in result.stderr
    assert result.stdout == ""


def test_status_before_any_worker_created_the_tables_says_so(sqlite_url: str) -> None:
    result = jobreaper(sqlite_url, "status")
    assert result.returncode == EXIT_FAILED
    assert "cannot read jobreaper_meta" in result.stderr


def test_status_with_a_source_that_does_not_fit_its_table_exits_2(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    create_seed(engine_for(sqlite_url), [])
    jobreaper(sqlite_url, "reap")  # creates jobreaper's tables
    result = jobreaper(
        sqlite_url, "status", settings={"sources": [{**SEED_SOURCE, "kind": "nope"}]}
    )
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "jobreaper_sources[0].kind" in result.stderr and "Traceback" not in result.stderr
