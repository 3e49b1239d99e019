"""One reap run: judge owners, plan each batch, settle it, record the run, report."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import insert, literal, select, update

from . import bulk, late_writes, signals
from .apply import settle_batch
from .broadcast import broadcast
from .broker.result import SweepResult
from .clock import db_utcnow, utcnow
from .database import Database
from .errors import MissingTableError
from .liveness import (
    ALL_REPLIES,
    Incarnation,
    Liveness,
    LivenessView,
    Pinger,
    mark_dead,
    newcomers,
    ping_with,
)
from .planner import Decision, TaskFacts, plan
from .report import Report
from .rules import NO_LIVE_WORKER_LEFT
from .schema import JobReaperTables, check_stored_version, check_version, create_all, tables
from .settings import Settings
from .settled import Settled, Tally
from .sources import JobSource, TrackedJobsSource, UserTableSource, resolve_table
from .textsafe import safe
from .vocabulary import MANUAL, PERIODIC, STARTUP
from .webhooks import Webhooks

logger = logging.getLogger(__name__)

#: ``ask(nodes, task_ids, timeout)`` -> task ids active/reserved/scheduled on those nodes.
TaskAsker = Callable[[Collection[str], Collection[str], float], set[str]]
#: Task ids this worker process holds (active, reserved, scheduled, rate-limited).
HeldIds = Callable[[], set[str]]
MAX_PLANNED_IN_REPORT = 1000
#: Seconds between two warnings about one configured table that does not exist (10 minutes).
MISSING_TABLE_REPEAT = 600.0


class Sweep(Protocol):
    """The broker side of a run (:class:`celery_jobreaper.sweep.BrokerSweep`)."""

    def queued_task_ids(self) -> set[str]:
        """Task ids whose messages wait in this worker's queues (for reconciliation)."""
        ...

    def sweep(self, run: Settled) -> SweepResult | None:
        """Clean the queues after the database phase; ``None``: the queues were left alone."""
        ...


class PeersUnsure(RuntimeError):
    """A live peer answered but could not tell (an error: jobreaper not installed there)."""


def ask_with(app: Any) -> TaskAsker:
    """A :data:`TaskAsker`: which of *task_ids* the live workers *nodes* hold.

    Sends jobreaper's own ``jobreaper_held`` command (:mod:`.broker.holders`) to exactly
    *nodes*, not Celery's ``query_task``: that one sees neither a rate-limited request waiting
    in a token bucket nor (before Celery 5.7) an ETA request waiting on the timer. A node
    that answers with an error (a worker without jobreaper installed, which cannot see those
    requests either) or incompletely makes the answer "don't know": :class:`PeersUnsure` is
    raised and the caller leaves those jobs alone this time. A node that does not answer
    within *timeout* is taken to hold none of them, as before: a worker still starting
    (registered, its startup reap not done, not consuming yet) cannot answer and holds
    nothing, and counting it as "don't know" would keep every reap near a starting peer
    from settling jobs with a task id (a busy ``-P solo`` peer cannot answer either).

    Every reply counts: replies are collected until none came for *timeout* seconds
    (:data:`ALL_REPLIES`), and read raw, not through ``inspect()``, whose replies are merged
    by node name: of two processes answering to one name, the later reply would hide a live
    peer's "I hold it" (or its failure to answer).
    """
    from .broker.holders import HELD_COMMAND

    def ask(nodes: Collection[str], task_ids: Collection[str], timeout: float) -> set[str]:
        if not nodes or not task_ids:
            return set()
        replies = broadcast(
            app,
            HELD_COMMAND,
            arguments={"tags": [], "ids": list(task_ids)},
            destination=nodes,
            reply=True,
            timeout=timeout,
            limit=ALL_REPLIES,
        )
        held: set[str] = set()
        answered: set[str] = set()
        unsure: set[str] = set()
        for reply in replies:
            for node, body in (reply or {}).items():
                if isinstance(body, dict) and body.get("complete") is True:
                    answered.add(node)
                    held.update(str(i) for i in body.get("ids") or ())
                else:
                    unsure.add(node)
        if unsure:
            raise PeersUnsure(
                "no complete answer from "
                + ", ".join(safe(n) for n in sorted(unsure))
                + " (jobreaper not installed there?)"
            )
        return held

    return ask


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
        missing_table_repeat: float = MISSING_TABLE_REPEAT,
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
        #: a worker skips a configured table that does not exist yet (a migration not run)
        #: and looks it up again on every reap; ``reap()`` from any other process raises
        self.skip_missing_tables = skip_missing_tables
        #: sources skipped by the last :meth:`prepare`: ``jobreaper_sources[i].table`` -> why
        self.missing_sources: dict[str, str] = {}
        #: seconds between two warnings about one missing table
        self.missing_table_repeat = missing_table_repeat
        self._missing_said: dict[str, float] = {}  # key -> when last warned (monotonic)
        self._tables_ready = False
        self._late_error: str | None = None
        self._sources: list[JobSource] | None = None
        self._lock = threading.Lock()

    def prepare_tables(self) -> None:
        """Create (if configured) and check jobreaper's own tables, once."""
        if self._tables_ready:
            return
        stored = create_all(self.db.engine, self.tables) if self.settings.create_tables else None
        if stored is not None:  # read while creating: not read again
            check_stored_version(stored)
        else:
            with self.db.connect() as conn:
                check_version(conn, self.tables)
        self._tables_ready = True

    def prepare(self) -> list[JobSource]:
        """Own tables, then the sources (resolved once; retried while a table is missing)."""
        self.prepare_tables()
        if self._sources is not None:
            return self._sources
        sources: list[JobSource] = []
        missing: dict[str, str] = {}
        with self.db.connect() as conn:
            if self.settings.track_tasks:
                sources.append(TrackedJobsSource(self.tables))
            for spec in self.settings.sources:
                try:
                    sources.append(UserTableSource(spec, resolve_table(spec, conn)))
                except MissingTableError as error:
                    if not self.skip_missing_tables:
                        raise
                    missing[error.key] = error.problem
        now = time.monotonic()
        for key, problem in missing.items():
            said = self._missing_said.get(key)
            if said is not None and now - said < self.missing_table_repeat:
                continue
            self._missing_said[key] = now
            logger.warning(
                "jobreaper: %s: %s; its jobs are not reaped until it exists (looked up again "
                "on every reap; this warning repeats every %g s while it is missing)",
                key,
                safe(problem),
                self.missing_table_repeat,
            )
        for key in self.missing_sources.keys() - missing.keys():
            self._missing_said.pop(key, None)
            logger.info("jobreaper: %s exists now; its jobs are reaped from now on", key)
        self.missing_sources = missing
        if not missing:
            self._sources = sources
        return sources

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
            try:
                settled = self._settle(tally, view)
                if self.sweep is not None:
                    swept = self.sweep.sweep(settled)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                report = Report.assemble(
                    tally, swept, duration=time.perf_counter() - began, error=error
                )
                self._finish(report)
            return report

    def _settle(self, tally: Tally, view: LivenessView | None) -> Settled:
        """The database phase: judge (unless *view* was), plan and settle every source;
        counted in *tally*."""
        sources = self.prepare()
        with self.db.connect() as conn:
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
            with conn.begin():
                key = conn.execute(
                    insert(self.tables.runs).values(
                        node=tally.node,
                        incarnation_id=self.me.id if self.me else None,
                        trigger=tally.trigger,
                        dry_run=tally.dry_run,
                        started_at=tally.started_at,
                    )
                ).inserted_primary_key
                tally.run_id = None if key is None else int(key[0])
            for node, why in view.refused_nodes.items():
                logger.error("jobreaper: refusing to settle jobs of %s: %s", safe(node), safe(why))
            queued = _Once(self._read_queues)
            for source in sources:
                self._reap_source(conn, source, view, tally, queued=queued)
            if not tally.dry_run and tally.trigger != STARTUP:
                # (not on the worker's start path: its first periodic reap checks)
                self._detect_late_writes(conn, sources, tally)
            if not tally.dry_run and view.dead_incarnations:
                with conn.begin():
                    mark_dead(conn, self.tables, view)
        return Settled.of(tally, view)

    def _reap_source(
        self,
        conn: Any,
        source: JobSource,
        view: LivenessView,
        tally: Tally,
        *,
        queued: _Once,
    ) -> None:
        # Ownerless rows only (no task ids): what matters is whether this worker holds any
        # task at all; checked again before each batch commits (see _reap_in_bulk).
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
        if settler is not None:
            self._reap_in_bulk(conn, source, settler, tally, view)
            return
        after: Any = None
        while True:
            with conn.begin():
                batch = source.batch(conn, after, self.settings.batch_size)
            if not batch:
                return
            after = batch[-1].job_id
            tally.candidates += len(batch)
            # Task facts are read after the rows: a task that wrote its row before the read
            # is held now, or has finished (and written its end; the update then misses).
            decisions = self._decide(batch, view, queued)
            fails = [d for d in decisions if d.verdict == "fail"]
            for d in decisions:
                if d.verdict == "leave":
                    tally.left_alone[d.reason] += 1
            if tally.dry_run:
                tally.would_settle += len(fails)
                for d in fails:
                    logger.info(
                        "jobreaper: [dry run] would clear job: %s (%s): %s",
                        safe(d.candidate.job_id),
                        safe(d.candidate.kind),
                        safe(d.reason),
                    )
                    if len(tally.planned) < MAX_PLANNED_IN_REPORT:
                        tally.planned.append(_planned(d))
                    if d.candidate.task_id:
                        tally.task_ids.add(d.candidate.task_id)
            elif fails:
                with conn.begin() as tx:
                    fails = self._still_alone(conn, view, fails, tally)
                    done = settle_batch(
                        conn,
                        self.db,
                        self.tables,
                        source.target,
                        fails,
                        now=tally.started_at,
                        run_id=tally.run_id,
                        revoked_expires=self.settings.revoked_expires,
                    )
                    if self._took_task_since(fails) or self._appeared_since(conn, view, done):
                        tx.rollback()
                        done = []
                self._settled(source, done, tally)
            if len(batch) < self.settings.batch_size:
                return

    def _detect_late_writes(self, conn: Any, sources: list[JobSource], tally: Tally) -> None:
        """Record late writes to recently settled user-table rows (see :mod:`.late_writes`).

        A failure here is logged (once per distinct error), never fails the reap."""
        user = [s for s in sources if isinstance(s, UserTableSource)]
        if not user or self.settings.late_write_window <= 0:
            return
        try:
            with conn.begin():
                found = late_writes.detect(
                    conn,
                    self.tables,
                    user,
                    now=tally.started_at,
                    window=self.settings.late_write_window,
                    run_id=tally.run_id,
                )
        except Exception as error:
            text = f"{type(error).__name__}: {error}"
            if text != self._late_error:
                logger.warning(
                    "jobreaper: could not check settled user-table rows for late writes (%s)",
                    safe(text.splitlines()[0]),
                    exc_info=True,
                )
            self._late_error = text
            return
        self._late_error = None
        late_writes.report(self, found)

    def _reap_in_bulk(
        self,
        conn: Any,
        source: JobSource,
        settler: bulk.BulkSettler,
        tally: Tally,
        view: LivenessView,
    ) -> None:
        """Settle *source* with one statement per batch (SQL decides; see :mod:`.bulk`)."""
        after: Any = None
        while True:
            # Settled jobs come back one by one only if someone reads them (log, signal).
            detail = logger.isEnabledFor(logging.INFO) or signals.jobs_settled.has_listeners(self)
            with conn.begin() as tx:
                if after is None and not _any_stale(conn, source):
                    # Nothing in a stale status: the batch statement (large: compiling it
                    # costs a worker start several ms) is not even built.
                    return
                got = settler.batch(conn, after, detail=detail)
                if settler.where == NO_LIVE_WORKER_LEFT and got.settled and self._held():
                    tx.rollback()  # this worker took a task meanwhile: the rule no longer holds
                    logger.info(
                        "jobreaper: this worker took a task during the reap; jobs without "
                        "owner are judged again next time"
                    )
                    return
                # Rows locked and changed, not committed: did a worker register (or come
                # back) since liveness was judged? Then "no live worker" no longer holds.
                came = (
                    newcomers(conn, self.tables, view)
                    if settler.where == NO_LIVE_WORKER_LEFT and got.settled
                    else []
                )
                if came:
                    tx.rollback()
                    _log_newcomers(came)
                    tally.candidates += got.seen
                    tally.left_alone.update(got.left_alone)
                    tally.left_alone[WORKER_APPEARED] += got.settled
                    return
            # counted only once the batch is committed
            tally.candidates += got.seen
            tally.left_alone.update(got.left_alone)
            if got.rows:
                self._settled(source, settler.decisions(got.rows), tally)
            elif got.settled:
                tally.settled += got.settled
                tally.per_source[source.name] += got.settled
            if not got.more:
                return
            after = got.last

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
                if not source.has_owner and not ownerless:
                    ownerless = bool(source.batch(conn, None, 1))
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

    def _read_queues(self) -> frozenset[str] | None:
        """Task ids waiting in the queues; ``None`` when they could not be read (unknown)."""
        if self.sweep is None:
            return frozenset()
        try:
            return frozenset(self.sweep.queued_task_ids())
        except Exception as error:
            logger.warning(
                "jobreaper: could not read the queues (%s); jobs with a task id are left alone "
                "this time",
                safe(error),
            )
            return None

    def _still_alone(
        self, conn: Any, view: LivenessView, fails: list[Decision], tally: Tally
    ) -> list[Decision]:
        """*fails*, less those that rest on "no live worker" if a worker appeared since *view*.

        Read in the apply transaction, after the batch was read: a worker registers before it
        consumes, so one that ran a job of the batch had registered before the batch was read
        and is seen here (SQLite's ``BEGIN IMMEDIATE`` holds every writer off meanwhile). Read
        again once the rows are locked (:meth:`_appeared_since`).
        """
        relying = [d for d in fails if d.reason == NO_LIVE_WORKER_LEFT]
        if not relying:
            return fails
        came = newcomers(conn, self.tables, view)
        if not came:
            return fails
        _log_newcomers(came)
        tally.left_alone[WORKER_APPEARED] += len(relying)
        return [d for d in fails if d.reason != NO_LIVE_WORKER_LEFT]

    def _appeared_since(self, conn: Any, view: LivenessView, done: list[Decision]) -> bool:
        """Whether, with the rows of *done* locked and changed, a worker is seen now that was
        not when :meth:`_still_alone` looked (then the whole batch is undone, and judged again
        next run): nothing a worker did after that look can be missed."""
        if not any(d.reason == NO_LIVE_WORKER_LEFT for d in done):
            return False
        came = newcomers(conn, self.tables, view)
        if came:
            _log_newcomers(came)
        return bool(came)

    def _took_task_since(self, fails: list[Decision]) -> bool:
        """Whether this worker took, since the plan, a task that may run one of *fails*.

        Checked with the rows locked, before the commit: a job without task id failed because
        no worker at all could run it, or owned by this node name while this worker held no
        task, while this worker now holds some task; or a job whose task this worker now
        holds.
        """
        if self.held is None:
            return False
        held = self._held()
        if not held:
            return False
        took = any(d.candidate.task_id in held for d in fails if d.candidate.task_id) or any(
            d.while_idle for d in fails
        )
        if took:
            logger.info(
                "jobreaper: this worker took a task during the reap; those jobs are judged "
                "again next time"
            )
        return took

    def _decide(self, batch: list[Any], view: LivenessView, queued: _Once) -> list[Decision]:
        """Plan a batch with its task facts: queued (read once per run), held here, held by
        live peers (asked once per batch, exactly them: :func:`ask_with`)."""
        with_task = any(c.task_id for c in batch)
        waiting = queued() if with_task else frozenset()
        facts = TaskFacts(
            queued=waiting or frozenset(),
            held_here=frozenset(self._held()),
        )
        decisions = plan(batch, view, facts, self.settings)
        if waiting is None:  # unknown is not "nothing queued": a retry may wait there
            return _leave_task_jobs(decisions, QUEUES_UNREAD)
        task_ids = [
            d.candidate.task_id for d in decisions if d.verdict == "fail" and d.candidate.task_id
        ]
        if not task_ids:
            return decisions
        nodes = {
            view.incarnation_nodes[i] for i in view.live_incarnations if i in view.incarnation_nodes
        } | view.live_nodes
        if view.me is not None:
            nodes.discard(view.me.node)
        if not nodes:
            return decisions
        try:
            peers = self.ask(sorted(nodes), task_ids, self.settings.ping_timeout)
        except Exception as error:
            logger.warning(
                "jobreaper: could not ask live workers %s about %d tasks (%s); "
                "leaving those jobs alone this time",
                sorted(nodes),
                len(task_ids),
                safe(error),
            )
            return _leave_task_jobs(decisions, "could not ask live workers about its task")
        if not peers:
            return decisions
        facts = dataclasses.replace(facts, held_by_peers=frozenset(peers))
        return plan(batch, view, facts, self.settings)

    def _settled(self, source: JobSource, done: list[Decision], tally: Tally) -> None:
        tally.settled += len(done)
        tally.per_source[source.name] += len(done)
        for d in done:
            logger.info(
                "jobreaper: Clearing job: %s (%s) from %s: %s",
                safe(d.candidate.job_id),
                safe(d.candidate.kind),
                safe(source.name),
                safe(d.reason),
            )
            if d.candidate.task_id:
                tally.task_ids.add(d.candidate.task_id)
        if done:
            signals.jobs_settled.send(sender=self, decisions=done, source=source.name)

    def _finish(self, report: Report) -> None:
        self._log(report)
        self.last_report = report
        if report.run_id is not None:
            try:
                with self.db.connect() as conn, conn.begin():
                    conn.execute(
                        update(self.tables.runs)
                        .where(self.tables.runs.c.id == report.run_id)
                        .values(
                            finished_at=report.started_at
                            + timedelta(seconds=report.duration or 0.0),
                            duration=report.duration,
                            candidates=report.candidates,
                            settled=report.settled or report.would_settle,
                            left_alone=sum(report.left_alone.values()),
                            error=report.error,
                        )
                    )
            except Exception:
                logger.exception("jobreaper: could not record the end of run %s", report.run_id)
        signals.reap_finished.send(sender=self, report=report)
        if self.webhooks is not None:
            self.webhooks.notify(report)

    def _log(self, report: Report) -> None:
        left = sum(report.left_alone.values())
        if report.error is not None:
            logger.error(
                "jobreaper: %s reap failed after %.3f s: %s (settled %d before that)",
                report.trigger,
                report.duration,
                safe(report.error),
                report.settled,
            )
        elif report.settled or report.would_settle:
            logger.info(
                "jobreaper: %s %d stale jobs to failed (%s) in %.3f s; left %d alone",
                "[dry run] would reset" if report.dry_run else "Reset",
                report.would_settle if report.dry_run else report.settled,
                ", ".join(f"{k}: {v}" for k, v in report.per_source.items()) or "dry run",
                report.duration,
                left,
            )
        else:
            # A periodic no-op is routine: keep it out of INFO.
            level = logging.DEBUG if report.trigger == PERIODIC else logging.INFO
            logger.log(
                level,
                "jobreaper: No stale jobs found (%s, %.3f s)%s",
                report.trigger,
                report.duration,
                f"; left {left} alone" if left else "",
            )
        for reason, count in report.left_alone.items():
            level = logging.DEBUG if report.trigger == PERIODIC else logging.INFO
            logger.log(level, "jobreaper: left %d job(s) alone: %s", count, safe(reason))


#: Left alone: a job without owner while a worker registered (or came back) during the reap.
WORKER_APPEARED = (
    "a worker registered or came back during the reap; judged again next time (it may be "
    "running it)"
)


def _log_newcomers(came: list[str]) -> None:
    logger.info(
        "jobreaper: %s registered or heartbeated during the reap; jobs without owner are "
        "judged again next time",
        ", ".join(safe(c) for c in came),
    )


#: Left alone: a job with a task id while the queues could not be read (its message, e.g. a
#: retry, may be waiting there).
QUEUES_UNREAD = "could not read the queues; its message may still be waiting"


def _leave_task_jobs(decisions: list[Decision], reason: str) -> list[Decision]:
    """Turn every would-fail decision about a job with a task id into "leave" (*reason*)."""
    return [
        Decision(d.candidate, "leave", reason) if d.verdict == "fail" and d.candidate.task_id else d
        for d in decisions
    ]


class _Once:
    """A value read at most once per run, on first use (``None``: it could not be read)."""

    def __init__(self, read: Callable[[], frozenset[str] | None]) -> None:
        self._read = read
        self._done = False
        self._value: frozenset[str] | None = None

    def __call__(self) -> frozenset[str] | None:
        if not self._done:
            self._value = self._read()
            self._done = True
        return self._value


def _any_stale(conn: Any, source: JobSource) -> bool:
    """Whether *source* has a row in a stale status (one indexed probe, ``LIMIT 1``)."""
    target = source.target
    probe = select(literal(1)).where(target.status.in_(target.stale_statuses)).limit(1)
    return conn.execute(probe).first() is not None


def _planned(d: Decision) -> dict[str, Any]:
    c = d.candidate
    return {
        "source": c.source,
        "job_id": str(c.job_id),
        "kind": c.kind,
        "status": c.status,
        "owner": c.owner,
        "task_id": c.task_id,
        "reason": d.reason,
        "error": d.error,
    }
