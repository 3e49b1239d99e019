"""Prometheus metrics: read from a real worker's ``/metrics`` after its real reap, and from
the registry after ``reap()`` in this process."""

from __future__ import annotations

import socket
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, select
from sqlalchemy.engine import Engine
from support import WorkerProcess, make_app, wait_until, worker_env

import celery_jobreaper
from celery_jobreaper.errors import ConfigurationError
from celery_jobreaper.settings import Settings
from celery_jobreaper.vocabulary import NO_LIVE_WORKER, OWNER_NEVER_REGISTERED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize(
    ("pool", "multiprocess"),
    [("prefork", False), ("prefork", True), ("gevent", False)],
    ids=["one-process", "multiprocess-dir", "gevent"],
)
def test_a_real_workers_startup_reap_is_counted_and_served(
    pool: str,
    multiprocess: bool,
    pg_url: str,
    engine_for: Callable[[str], Engine],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    engine = engine_for(pg_url)
    table = create_seed(engine, [{"job_id": "ghost"}, {"job_id": "other", "job_type": "encode"}])
    port = _free_port()
    env = worker_env(
        pg_url,
        f"q-{uuid.uuid4().hex[:8]}",
        sources=[SEED_SOURCE],
        interval=3600,
        metrics=True,
        metrics_port=port,
        metrics_addr="127.0.0.1",
    )
    if multiprocess:  # prometheus_client's mode for prefork: every process writes here
        folder = tmp_path / "prom"
        folder.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    worker = start_worker(f"metrics-{uuid.uuid4().hex[:8]}@jrtest", env=env, pool=pool)
    worker.wait_for(r"ready\.")
    with engine.connect() as conn:
        assert {r.job_id: r.status for r in conn.execute(select(table))} == {
            "ghost": "failed",
            "other": "failed",
        }
    values = wait_until(lambda: _scrape(port), 30, "the worker's /metrics")

    def value(name: str, **labels: str) -> float | None:
        return values.get((name, tuple(sorted(labels.items()))))

    settled = "jobreaper_jobs_settled_total"
    assert value(settled, source="system_jobs", kind="library_scan", cause=NO_LIVE_WORKER) == 1
    assert value(settled, source="system_jobs", kind="encode", cause=NO_LIVE_WORKER) == 1
    assert value("jobreaper_runs_total", trigger="startup", outcome="ok") == 1
    assert value("jobreaper_run_duration_seconds_count", trigger="startup") == 1
    assert value("jobreaper_live_incarnations") == 1
    assert value("jobreaper_stale_candidates") == 2
    assert f"jobreaper: serving Prometheus metrics on 127.0.0.1 port {port}" in worker.output()


def test_reap_in_this_process_counts_by_cause_and_not_in_a_dry_run(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """A table with an owner column: a job of a node that never registered and does not answer
    is settled with the cause ``owner_never_registered``; a dry run before it counts a run
    only. (The registry is this process's global one: values are compared before and after.)"""
    engine = engine_for(pg_url)
    name = f"owned_{uuid.uuid4().hex[:8]}"
    owned = Table(
        name,
        MetaData(),
        Column("id", String(64), primary_key=True),
        Column("status", String(16)),
        Column("owner", String(200)),
        Column("kind", String(50)),
        Column("started_at", DateTime),
        Column("error", Text),
    )
    owned.create(engine)
    with engine.begin() as conn:
        conn.execute(
            owned.insert(),
            [
                {
                    "id": "j1",
                    "status": "running",
                    "owner": "gone@nowhere",
                    "kind": "export",
                    "started_at": ago(hours=1),
                }
            ],
        )
    source = {
        "table": name,
        "id": "id",
        "status": "status",
        "owner": "owner",
        "kind": "kind",
        "started_at": "started_at",
        "error": "error",
    }
    app = make_app(pg_url, sources=[source], metrics=True)

    def sample(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, labels) or 0.0

    labels = {"source": name, "kind": "export", "cause": OWNER_NEVER_REGISTERED}
    before = sample("jobreaper_jobs_settled_total", **labels)
    dry_before = sample("jobreaper_runs_total", trigger="manual", outcome="dry_run")
    ok_before = sample("jobreaper_runs_total", trigger="manual", outcome="ok")

    plan = celery_jobreaper.reap(app, dry_run=True)
    assert plan.would_settle == 1
    assert sample("jobreaper_jobs_settled_total", **labels) == before
    assert sample("jobreaper_runs_total", trigger="manual", outcome="dry_run") == dry_before + 1

    report = celery_jobreaper.reap(app)
    assert report.settled == 1
    assert sample("jobreaper_jobs_settled_total", **labels) == before + 1
    assert sample("jobreaper_runs_total", trigger="manual", outcome="ok") == ok_before + 1


def test_settings_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app("sqlite://", metrics_port=9999)
    with pytest.raises(ConfigurationError, match="jobreaper_metrics_port"):
        Settings.from_app(app)
    from celery_jobreaper import metrics

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ConfigurationError, match="jobreaper_metrics: set, but prometheus_client"):
        metrics.Metrics(registry=object())
