"""One reap run: judge owners, settle each source (the set-based or the Python stage), check
for late writes, mark the dead, sweep the broker, record the run, report."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import bulk, signals
from .batchplan import Once, read_queues
from .broker.result import SweepResult
from .bulk_stage import reap_in_bulk
from .catalog import MISSING_TABLE_REPEAT, Catalog
from .clock import db_utcnow, utcnow
from .database import Database
from .incarnation import Incarnation
from .late_check import check_late_writes
from .lease import LeaseLost
from .liveness import Liveness, mark_dead
from .livenessview import LivenessView
from .peers import TaskAsker, ask_with
from .ping import Pinger, ping_with
from .planner import TaskFacts
from .python_stage import reap_in_python
from .report import Report
from .runlog import close_run, log_run, open_run, record_run, worth_a_row
from .schema import JobReaperTables, tables
from .settings import Settings
from .settled import Settled, Tally
from .sightings import Sightings
from .sources import JobSource
from .sources.base import any_stale
from .textsafe import safe
from .vocabulary import MANUAL, PERIODIC, STARTUP
from .webhooks import Webhooks

if TYPE_CHECKING:
    from .metrics import Metrics

logger = logging.getLogger(__name__)

#: Task ids this worker process holds (active, reserved, scheduled, rate-limited).
HeldIds = Callable[[], set[str]]
#: Called first in each write transaction of a periodic reap: raises
#: :class:`~celery_jobreaper.lease.LeaseLost` unless this worker leads (:meth:`Lease.fence`).
Fence = Callable[[Any], object]


class Sweep(Protocol):
    """The broker side of a run (:class:`celery_jobreaper.sweep.BrokerSweep`)."""

    def queued_task_ids(self) -> set[str] | None:
        """Task ids whose messages wait in the queues (``None``: they cannot be read)."""
        ...

    def sweep(self, run: Settled) -> SweepResult | None:
        """Clean the queues after the database phase; ``None``: the queues were left alone."""
        ...


class Reaper:
    """Settles stale jobs of every configured source; safe to run from many processes at once."""

    def __init__(
        self,
        app: Any,
        settings: Settings,
        db: Database,
        *,
        tbls: JobReaperTables = tables,
        me: Incarnation | None = None,
        ping: Pinger | None = None,
        ask: TaskAsker | None = None,
        held: HeldIds | None = None,
        sweep: Sweep | None = None,
        skip_missing_tables: bool = False,
        webhooks: Webhooks | None = None,
        metrics: Metrics | None = None,
        missing_table_repeat: float = MISSING_TABLE_REPEAT,
        fence: Fence | None = None,
        sightings: Sightings | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.db = db
        self.tables = tbls
        self.me = me
        self.ping = ping if ping is not None else ping_with(app, me)
        self.ask = ask if ask is not None else ask_with(app)
        #: in a worker, the tasks it holds; ``None`` in a process that runs no task
        self.held = held
        self.liveness = Liveness(
            tbls,
            heartbeat_timeout=settings.heartbeat_timeout,
            heartbeat_interval=settings.heartbeat_interval,
        )
        #: the broker sweep run after each database phase (``None``: the queues are not read)
        self.sweep = sweep
        self.last_report: Report | None = None
        #: posts each report that settled something to ``jobreaper_webhooks`` (in its thread)
        self.webhooks = webhooks
        #: Prometheus metrics fed from each report (``jobreaper_metrics``)
        self.metrics = metrics
        #: own tables and sources (a configured table that does not exist yet is skipped by
        #: a worker and looked up again on every reap; ``reap()`` elsewhere raises)
        self.catalog = Catalog(
            db,
            settings,
            tbls,
            skip_missing_tables=skip_missing_tables,
            missing_table_repeat=missing_table_repeat,
            app=app,
        )
        self._late_error: str | None = None
        self._lock = threading.Lock()
        #: periodic reaps are the cluster leader's: each write transaction is fenced
        self.fence = fence
        #: when this reaper first saw each job without owner whose start is unknown (the "no
        #: live worker" rule ages such a job by it); a new one knows none
        self.sightings = sightings if sightings is not None else Sightings()

    def prepare_tables(self) -> None:
        """Create (if configured) and check jobreaper's own tables, once."""
        self.catalog.prepare_tables()

    def prepare(self) -> list[JobSource]:
        """Own tables, then the sources (resolved once; retried while a table is missing)."""
        return self.catalog.prepare()

    @property
    def missing_sources(self) -> dict[str, str]:
        """Configured tables skipped by the last :meth:`prepare`: key -> why."""
        return self.catalog.missing_sources

    def assess(self) -> LivenessView:
        """The first stage of a run on its own: who is alive, judged now (see :meth:`run`)."""
        sources = self.prepare()
        with self.db.connect() as conn:
            return self._assess(conn, sources)

    def run(
        self,
        trigger: str = MANUAL,
        *,
        dry_run: bool | None = None,
        view: LivenessView | None = None,
    ) -> Report:
        """Reap once. Errors are recorded in the report (and the runs table), then re-raised.

        The database phase returns what it settled; the sweep receives that and returns what
        it did; the report is assembled from both. *view*: the liveness judged earlier by
        :meth:`assess` (default: judged now, at the start of the run).
        """
        dry = self.settings.dry_run if dry_run is None else dry_run
        with self._lock:
            tally = Tally(
                trigger=trigger,
                dry_run=dry,
                started_at=utcnow(),
                node=self.me.node if self.me else None,
            )
            swept: SweepResult | None = None
            error: str | None = None
            began = time.perf_counter()
            lost: LeaseLost | None = None
            try:
                self._check_fence(tally)  # a worker that does not lead asks nobody anything
                settled = self._settle(tally, view)
                if self.sweep is not None:
                    self._check_fence(tally)
                    swept = self.sweep.sweep(settled)
            except LeaseLost as exc:
                lost = exc  # not an error of the reap: this worker is not the leader
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                # Sightings not renewed by this run are forgotten, also when it stopped early
                # (this worker does not lead, an error): forgetting only delays a verdict.
                self.sightings.end_run()
                report = Report.assemble(
                    tally, swept, duration=time.perf_counter() - began, error=error
                )
                if lost is None or tally.run_id is not None:
                    self._finish(report)
            if lost is not None:
                logger.warning("jobreaper: periodic reap stopped: %s", lost)
            return report

    def _fenced(self, tally: Tally) -> bool:
        return self.fence is not None and tally.trigger == PERIODIC

    def _fence_for(self, tally: Tally) -> Fence:
        """What the run calls first in each write transaction: in a periodic reap of a
        fenced reaper, raise unless this worker leads; else nothing."""
        return self.fence if self.fence is not None and self._fenced(tally) else _unfenced

    def _fence_in(self, conn: Any, tally: Tally) -> None:
        """In a write transaction of a periodic reap: raise unless this worker leads."""
        self._fence_for(tally)(conn)

    def _check_fence(self, tally: Tally) -> None:
        """Before the broker sweep of a periodic reap: raise unless this worker leads."""
        if self._fenced(tally):
            with self.db.connect() as conn, conn.begin():
                self._fence_in(conn, tally)

    def _settle(self, tally: Tally, view: LivenessView | None) -> Settled:
        """The database phase: judge (unless *view* was), plan and settle every source;
        counted in *tally*."""
        sources = self.prepare()
        with self.db.connect_fresh_reads() as conn:
            if view is None:
                view = self._assess(conn, sources)
            if view.recheck_in is not None and tally.trigger == STARTUP:
                # An earlier start of this node name heartbeated moments ago: it crashed just
                # now (a quick restart) or it is a live duplicate. Before consuming, wait
                # until it has missed two heartbeats, then judge again (once).
                logger.info(
                    "jobreaper: an earlier start of %s heartbeated moments ago; waiting %.1f s "
                    "to tell a restart from a live duplicate",
                    tally.node,
                    view.recheck_in,
                )
                time.sleep(view.recheck_in + 0.1)
                view = self._assess(conn, sources)
            # One clock: the run's time (ages, completed_at, the ledger) is the database's.
            tally.started_at = view.now
            tally.live_workers = len(view.live_incarnations)
            with conn.begin():
                self._fence_in(conn, tally)
                # A periodic reap with no job in a stale status anywhere writes no runs row
                # (the table grows only by cycles that found something); nothing to settle.
                idle = tally.trigger == PERIODIC and not any(any_stale(conn, s) for s in sources)
                if not idle:
                    tally.run_id = open_run(
                        conn, self.tables, tally, self.me.id if self.me else None
                    )
            for node, why in view.refused_nodes.items():
                logger.error("jobreaper: refusing to settle jobs of %s: %s", safe(node), safe(why))
            queued = Once(
                lambda: read_queues(None if self.sweep is None else self.sweep.queued_task_ids)
            )
            for source in sources if not idle else ():
                self._reap_source(conn, source, view, tally, queued=queued)
            if not tally.dry_run and tally.trigger != STARTUP:
                # (not on the worker's start path: its first periodic reap checks)
                self._late_error = check_late_writes(
                    conn,
                    sources,
                    self.tables,
                    window=self.settings.late_write_window,
                    now=tally.started_at,
                    run_id=tally.run_id,
                    fence=self._fence_for(tally),
                    last_error=self._late_error,
                    sender=self,
                    metrics=self.metrics,
                )
            if not tally.dry_run and view.dead_incarnations:
                with conn.begin():
                    self._fence_in(conn, tally)
                    mark_dead(conn, self.tables, view, skip_locked=self.db.skip_locked)
        return Settled.of(tally, view)

    def _reap_source(
        self,
        conn: Any,
        source: JobSource,
        view: LivenessView,
        tally: Tally,
        *,
        queued: Once,
    ) -> None:
        # Ownerless rows only (no task ids): what matters is whether this worker holds any
        # task at all; checked again before each batch commits (see bulk_stage).
        rule = TaskFacts(held_here=frozenset(self._held())).ownerless_rule(view, self.settings)
        settler = bulk.settler_for(
            conn,
            source,
            self.tables,
            self.settings,
            rule,
            dry_run=tally.dry_run,
            now=tally.started_at,
            run_id=tally.run_id,
        )
        if settler is not None and reap_in_bulk(
            conn,
            source,
            settler,
            tally,
            view,
            tables=self.tables,
            sightings=self.sightings,
            held=self._held,
            fence=self._fence_for(tally),
            sender=self,
        ):
            return
        reap_in_python(
            conn,
            source,
            view,
            tally,
            queued=queued,
            settings=self.settings,
            db=self.db,
            tables=self.tables,
            sightings=self.sightings,
            held=self._held,
            ask=self.ask,
            fence=self._fence_for(tally),
            sender=self,
        )

    def _assess(self, conn: Any, sources: list[JobSource]) -> LivenessView:
        """Judge the owners of every source's stale jobs (one transaction, the database's
        clock read in it). When a table without owner column has stale jobs, whether any
        other worker at all is live is asked too (see ``confirm_alone``)."""
        with conn.begin():
            now = db_utcnow(conn)
            inc_ids: set[str] = set()
            nodes: set[str] = set()
            ownerless = False
            for source in sources:
                ids, names = source.owners(conn)
                inc_ids |= ids
                nodes |= names
                if not ownerless:  # a stale row no owner is known for (a NULL owner too)
                    ownerless = source.has_ownerless_stale(conn)
            return self.liveness.assess(
                conn,
                me=None if self.me is None else self.me.as_of_now(),
                incarnation_ids=inc_ids,
                nodes=nodes,
                ping=self.ping,
                ping_timeout=self.settings.ping_timeout,
                now=now,
                confirm_alone=ownerless,
            )

    def _held(self) -> set[str]:
        return set() if self.held is None else self.held()

    def _finish(self, report: Report) -> None:
        log_run(report)
        self.last_report = report
        if report.run_id is None and report.trigger == PERIODIC and worth_a_row(report):
            # a periodic reap with nothing stale, whose sweep acted or that failed: recorded
            report.run_id = record_run(
                self.db, self.tables, report, self.me.id if self.me else None
            )
        close_run(self.db, self.tables, report)
        if self.metrics is not None:
            self.metrics.observe(report)
        signals.reap_finished.send(sender=self, report=report)
        if self.webhooks is not None:
            self.webhooks.notify(report)


def _unfenced(conn: Any) -> None:
    """The fence of a run that is not fenced (not periodic, or no lease): nothing to check."""
