"""Prometheus metrics of reaps (the optional ``metrics`` extra: ``prometheus_client``).

Fed from each run's :class:`~celery_jobreaper.report.Report` (the reaper hands it over after
the run, in its own thread) and from late results. Labels are a few fixed words: sources and
kinds come from the configuration and the job tables, causes from
:data:`~celery_jobreaper.vocabulary.CAUSES`; node names and job ids are never labels.

With the prefork pool, late results of tracked jobs are counted in the pool process that ran the
task: set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) for them to be
collected; ``jobreaper_metrics_port`` then serves every process's values.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any

from . import native
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .report import Report
    from .settings import Settings

logger = logging.getLogger(__name__)

#: Upper bounds (seconds) of the run duration histogram's buckets.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Broker counts of a report that become ``jobreaper_broker_messages_total`` (by action).
BROKER_ACTIONS = ("removed", "restored", "dropped_unacked", "purged", "neutralized")


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as error:
        raise ConfigurationError(
            "jobreaper_metrics",
            "set, but prometheus_client is not installed: pip install 'celery_jobreaper[metrics]'",
        ) from error
    return prometheus_client


class Metrics:
    """jobreaper's counters, histogram and gauges, registered in *registry*
    (default: prometheus_client's global registry, once per process)."""

    def __init__(self, registry: Any = None) -> None:
        client = _client()
        kw: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.settled = client.Counter(
            "jobreaper_jobs_settled",
            "Jobs settled as failed, by source, kind and cause.",
            ["source", "kind", "cause"],
            **kw,
        )
        self.runs = client.Counter(
            "jobreaper_runs",
            "Reap runs, by trigger and outcome (ok, error, dry_run).",
            ["trigger", "outcome"],
            **kw,
        )
        self.duration = client.Histogram(
            "jobreaper_run_duration_seconds",
            "Seconds one reap run took, by trigger.",
            ["trigger"],
            buckets=DURATION_BUCKETS,
            **kw,
        )
        self.candidates = client.Gauge(
            "jobreaper_stale_candidates",
            "Jobs in a stale status that the last run judged (settled or left alone).",
            multiprocess_mode="mostrecent",
            **kw,
        )
        self.left_alone = client.Gauge(
            "jobreaper_left_alone",
            "Stale-status jobs the last run left alone (their runner may be alive).",
            multiprocess_mode="mostrecent",
            **kw,
        )
        self.live = client.Gauge(
            "jobreaper_live_incarnations",
            "Live workers (incarnations) the last run saw, this one included.",
            multiprocess_mode="mostrecent",
            **kw,
        )
        self.broker = client.Counter(
            "jobreaper_broker_messages",
            "Broker messages removed, restored, dropped or purged by the sweep, by action.",
            ["action"],
            **kw,
        )
        self.late = client.Counter(
            "jobreaper_late_results",
            "Finishes of jobs after jobreaper had settled them, by source.",
            ["source"],
            **kw,
        )

    def observe(self, report: Report) -> None:
        """Count one finished run (never raises: metrics must not fail a reap)."""
        try:
            self._observe(report)
        except Exception:
            logger.exception("jobreaper: could not update the metrics of a run")

    def _observe(self, report: Report) -> None:
        outcome = "error" if report.error else ("dry_run" if report.dry_run else "ok")
        self.runs.labels(report.trigger, outcome).inc()
        self.duration.labels(report.trigger).observe(report.duration)
        if report.error is None:
            self.candidates.set(report.candidates)
            self.left_alone.set(sum(report.left_alone.values()))
        if report.live_workers is not None:
            self.live.set(report.live_workers)
        if not report.dry_run:
            for (source, kind, cause), n in report.settled_by.items():
                self.settled.labels(source, kind, cause).inc(n)
            for action in BROKER_ACTIONS:
                n = report.broker.get(action, 0)
                if n:
                    self.broker.labels(action).inc(n)

    def late_results(self, source: str, count: int) -> None:
        """Count *count* late results (or late writes) of *source*."""
        try:
            self.late.labels(source).inc(count)
        except Exception:
            logger.exception("jobreaper: could not update the late-results metric")


@functools.cache
def _shared() -> Metrics:
    return Metrics()


def metrics_for(settings: Settings) -> Metrics | None:
    """This process's :class:`Metrics` when ``jobreaper_metrics`` is on (made once: the
    global registry refuses a second set of the same names)."""
    return _shared() if settings.metrics else None


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` on *port* from a real thread of its own (the worker's main process;
    under gevent too, where a green thread would stall while a task never yields); with
    ``PROMETHEUS_MULTIPROC_DIR`` set, every process's values are collected. Returns the server
    (``shutdown()`` stops it)."""
    # (imported here: wsgiref and http.server cost every worker's start ~10 ms otherwise)
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class _QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """No access log on stderr (scrapes every few seconds)."""

    client = _client()
    registry = client.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server = make_server(addr, port, client.make_wsgi_app(registry), handler_class=_QuietHandler)
    native.start_thread("jobreaper-metrics", server.serve_forever)
    logger.info("jobreaper: serving Prometheus metrics on %s port %d", addr, server.server_port)
    return server
