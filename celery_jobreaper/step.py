"""The worker bootstep: reap before the consumer starts, then heartbeat and reap on a timer."""

from __future__ import annotations

import logging
from typing import Any

import click
from celery import bootsteps
from celery import signals as celery_signals

from . import workerstate
from .database import Database
from .errors import ConfigurationError, StartupReapError
from .extras import check_broker_transport
from .incarnation import Incarnation
from .lease import Lease
from .metrics import Metrics, metrics_for, serve
from .poolwatch import HubNudge, PoolWatch, abnormal, pool_processes
from .prune_cycle import PruneCycle
from .reaper import Reaper
from .remote import ReapRequest, RemoteReaps
from .revoked import RevokedSync
from .schema import tables
from .service import ReaperService
from .settings import Settings
from .sightings import Sightings
from .sweep import BrokerSweep, worker_queues
from .tracking import Tracker, connect_signals, set_tracker
from .webhooks import webhooks_for

logger = logging.getLogger(__name__)


class JobReaperStep(bootsteps.StartStopStep):
    """Settle jobs left running by dead workers, safely when many workers share the database.

    Runs in the worker's main process after the pool started and before the consumer takes
    any message. ``start()`` never lets an error escape (the worker always starts) unless
    ``jobreaper_strict`` is set or the configuration is invalid.
    """

    label = "JobReaper"
    conditional = True
    requires = ("celery.worker.components:Pool",)

    def __init__(
        self,
        parent: Any,
        without_jobreaper: bool = False,
        jobreaper_dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(parent, **kwargs)
        self.service: ReaperService | None = None
        self.tracker: Tracker | None = None
        self._nudge: HubNudge | None = None
        self._watch: PoolWatch | None = None
        self.metrics: Metrics | None = None
        self._metrics_server: Any = None
        overrides = {"dry_run": True} if jobreaper_dry_run else {}
        try:
            self.settings = Settings.from_app(parent.app, **overrides)
        except ConfigurationError as error:
            if not without_jobreaper:
                raise
            # Not reaping here: invalid jobreaper settings do not stop this worker; it just
            # cannot register either.
            logger.warning("jobreaper: this worker does not register (%s)", error)
            self.enabled = False
            return
        #: whether this worker reaps; a worker that does not still registers and heartbeats
        #: (it is live, and its jobs must not look like a dead worker's)
        self.reaps = self.settings.enabled and not without_jobreaper
        self.enabled = self.settings.database_url is not None or self.settings.engine is not None
        if not self.enabled:
            return
        me = Incarnation.new(parent.hostname)
        db = Database.from_settings(self.settings)
        self.metrics = metrics_for(self.settings)
        self.service = self._build(parent, me, db)
        if self.settings.track_tasks:
            # Made before the pool forks, so pool processes inherit it.
            self.tracker = Tracker(db, tables, self.settings, me, metrics=self.metrics)
            set_tracker(self.tracker)
            connect_signals()
        logger.debug(
            "jobreaper: %s on %s (database %s)",
            "enabled" if self.reaps else "registers and heartbeats only (no reaping)",
            me.node,
            db.url,
        )

    def _build(self, parent: Any, me: Incarnation, db: Database) -> ReaperService:
        """Every collaborator of the reaper and the service, handed to their constructors."""
        app = parent.app
        sweep = (
            BrokerSweep(app, self.settings, db, tables, worker_queues(app)) if self.reaps else None
        )
        # The cluster's periodic reap is led by one worker at a time (see lease.py).
        lease = Lease(db, tables, holder=me.id, node=me.node, timeout=self.settings.lease_timeout)
        reaper = Reaper(
            app,
            self.settings,
            db,
            me=me,
            # This worker is a live worker too: the tasks it holds protect their jobs.
            held=workerstate.held_by(parent),
            sweep=sweep,
            # a table not migrated yet: skipped and looked up again, unless strict
            skip_missing_tables=not self.settings.strict,
            webhooks=webhooks_for(self.settings),
            metrics=self.metrics,
            fence=lease.fence,
            # first sightings of jobs whose start is unknown, kept for the worker's life
            sightings=Sightings(),
        )
        return ReaperService(
            reaper,
            me,
            reaps=self.reaps,
            revoked_sync=RevokedSync(db, tables, self.settings, me.node),
            remote=RemoteReaps(app, reaper, me.node) if self.reaps else None,
            prune=(
                PruneCycle(db, self.settings, lease, self.settings.prune_interval)
                if self.reaps and self.settings.prune_interval is not None
                else None
            ),
            lease=lease,
            lead=self.settings.lead,
            # (a dry run changes nothing in memory either)
            follow=None if sweep is None or self.settings.dry_run else sweep.follow,
        )

    @property
    def incarnation_id(self) -> str | None:
        """This worker's incarnation id (``None`` when it has none)."""
        return None if self.service is None else self.service.me.id

    def request_reap(self, request: ReapRequest) -> dict[str, Any]:
        """A reap asked for by remote control: queued, never run here (the caller is the
        consumer's event loop). Returns the control command's reply."""
        service = self.service
        if service is None or service.remote is None:
            return {"error": "jobreaper does not reap on this worker"}
        return service.remote.request(request)

    def create(self, parent: Any) -> JobReaperStep:  # type: ignore[override]
        """Nothing to create: the service was built in ``__init__``."""
        return self

    def start(self, parent: Any) -> None:
        """Reap once, before the consumer starts, then start the background threads."""
        service = self.service
        if service is None:
            return
        try:
            service.startup()
        except ConfigurationError:
            raise  # invalid configuration stops the worker, naming the key
        except Exception as error:
            if self.settings.strict:
                raise StartupReapError(
                    f"jobreaper: startup reap failed and jobreaper_strict is set: {error}"
                ) from error
            logger.exception(
                "jobreaper: startup reap failed; the worker starts anyway and jobreaper retries "
                "every %g s",
                min(self.settings.heartbeat_interval, self.settings.interval),
            )
        service.start_threads()
        self._serve_metrics()
        celery_signals.worker_shutdown.connect(self._on_shutdown, sender=parent, weak=False)

    def _serve_metrics(self) -> None:
        """``jobreaper_metrics_port``: serve ``/metrics`` (a port in use is logged; the
        worker starts anyway)."""
        port = self.settings.metrics_port
        if port is None or self._metrics_server is not None:
            return
        try:
            self._metrics_server = serve(port, self.settings.metrics_addr)
        except Exception:
            logger.exception("jobreaper: could not serve metrics on port %d", port)

    def register_with_event_loop(self, parent: Any, hub: Any) -> None:
        """On the worker's event loop, at each consumer start: watch the prefork pool's
        processes, so that the worker notices a dead one at once (:mod:`.poolwatch`)."""
        service = self.service
        if service is None or not (self.reaps or self.tracker is not None):
            return
        if self._nudge is None:
            processes = pool_processes(parent)
            if processes is None:  # solo, threads, gevent, eventlet: no pool processes
                return
            self._nudge = HubNudge(parent.pool.maintain_pool, service.reap_soon)
            self._watch = PoolWatch(processes, self._pool_process_exited)
            self._watch.start()
        self._nudge.register(hub)

    def _pool_process_exited(self, pid: int, code: int | None) -> None:
        """(The pool watch's thread.) Have the event loop run Celery's ``maintain_pool`` now."""
        nudge = self._nudge
        if nudge is None:
            return
        lost = abnormal(code)
        if lost:
            logger.info(
                "jobreaper: pool process %d exited (%s); the worker looks at its tasks now",
                pid,
                "exit code unknown" if code is None else f"exit code {code}",
            )
        nudge.nudge(lost)

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()

    def _on_shutdown(self, sender: Any = None, **_: Any) -> None:
        self._stop_watch()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self._flush_tracking()
        if self.service is not None:
            self.service.stop()

    def _flush_tracking(self) -> None:
        """Write the task records this process still holds (solo and threads pools)."""
        if self.tracker is not None:
            self.tracker.flush_before_exit("the worker stops")

    def stop(self, parent: Any) -> None:
        """Warm shutdown: stop reaping, mark the incarnation draining while tasks finish."""
        self._stop_watch()
        self._flush_tracking()
        if self.service is not None:
            self.service.drain()

    def terminate(self, parent: Any) -> None:
        """Cold shutdown: stop the threads and mark the incarnation stopped now."""
        self._stop_watch()
        self._flush_tracking()
        if self.service is not None:
            self.service.stop()

    def info(self, parent: Any) -> dict[str, Any]:  # type: ignore[override]
        """What ``celery inspect stats`` shows under ``jobreaper``."""
        service = self.service
        if service is None:
            return {"jobreaper": {"enabled": False}}
        report = service.reaper.last_report
        return {
            "jobreaper": {
                "enabled": self.reaps,
                "incarnation": service.me.id,
                "dry_run": self.settings.dry_run,
                "settings": self.settings.summary(),
                "last_run": report.as_dict() if report else None,
                "leads": service.lease is not None and service.lease.leads,
                "leader": _leader(service),
                "missing_tables": dict(service.reaper.missing_sources),
            }
        }


def _leader(service: ReaperService) -> dict[str, Any] | None:
    """Who leads the cluster's maintenance, as this worker last read it (at its heartbeat)."""
    last = None if service.lease is None else service.lease.last
    return None if last is None else last.as_dict()


def install(app: Any) -> Any:
    """Add :class:`JobReaperStep`, its worker options and the ``jobreaper`` inspect command."""
    from . import control  # noqa: F401  (registers the remote-control command)

    app.steps["worker"].add(JobReaperStep)
    celery_signals.celeryd_init.connect(
        _check_broker_before_worker_connects, weak=False, dispatch_uid="jobreaper.broker-check"
    )
    options = app.user_options["worker"]
    names = {opt.name for opt in options}
    if "without_jobreaper" not in names:
        options.add(
            click.Option(
                ["--without-jobreaper"],
                is_flag=True,
                default=False,
                help="Do not run celery_jobreaper in this worker.",
            )
        )
    if "jobreaper_dry_run" not in names:
        options.add(
            click.Option(
                ["--jobreaper-dry-run"],
                is_flag=True,
                default=False,
                help="Log what celery_jobreaper would settle; change nothing.",
            )
        )
    return app


def _check_broker_before_worker_connects(instance: Any = None, **_: Any) -> None:
    """``celeryd_init``: stop with one clear line if the broker's client library is missing.

    The worker opens its broker connection before any bootstep is made, so without this a
    missing extra ends in a traceback from deep inside kombu. ``SystemExit`` is not swallowed
    by Celery's signal dispatch (an ``Exception`` would only be logged).
    """
    if instance is None:
        return
    try:
        check_broker_transport(instance.app)
    except ConfigurationError as error:
        raise SystemExit(str(error)) from error
