"""The broker sweep: after each reap, remove revoked and settled jobs' messages exactly.

Runs after the database commit of a reap (the reaper's ``sweep``, given to its constructor),
on this worker's queues; it receives what the run settled and returns what it did. Messages
whose task is revoked (durably, see :mod:`celery_jobreaper.revoked`)
or whose job was settled as failed are removed; on Redis, messages a dead worker took but never
acknowledged are dropped (revoked/failed) or restored to their queue now instead of after
``visibility_timeout``. ``jobreaper_queue_cleanup = "purge"`` empties this worker's queues at
startup instead (the seed's behaviour); ``"off"`` leaves the queues alone (both still keep
this worker's revoked set up to date). The Redis side lives in :mod:`.sweep_redis`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from . import ledger, sweep_redis, workerstate
from . import revoked as revoked_store
from .broadcast import broadcast
from .broker.result import SweepResult
from .database import Database
from .livenessview import LivenessView
from .schema import JobReaperTables
from .settings import Settings
from .settled import Settled
from .vocabulary import DROPPED, PURGED, REMOVED, RESTORED, STARTUP

logger = logging.getLogger(__name__)

#: Task ids per revoke broadcast (a settled job's task is revoked on live workers too).
REVOKE_CHUNK = 1000
#: The ``source`` of the sweep's ledger events.
BROKER = "broker"


class BrokerSweep:
    """Cleans this worker's queues after each reap; it reads them for the planner too."""

    def __init__(
        self,
        app: Any,
        settings: Settings,
        db: Database,
        tables: JobReaperTables,
        queues: Callable[[], Sequence[str]],
    ) -> None:
        self.app = app
        self.settings = settings
        self.db = db
        self.tables = tables
        self.queues = queues
        self._asked_live_revoked = False
        self._swept: set[str] = set()

    # -- the sweep --------------------------------------------------------------------------

    def sweep(self, run: Settled) -> SweepResult | None:
        """Sweep after a run's database phase and return what it did (``None``: the queues
        were left alone). Errors are logged, never raised (the next reap retries)."""
        mode = self.settings.queue_cleanup
        try:
            if mode != "selective" and not run.dry_run:
                # The queues are left alone, but settled jobs' and revoked tasks' messages
                # must still never run here: keep this worker's revoked set up to date.
                self.follow()
            if mode == "off":
                return None
            if mode == "purge":
                return self._purge(run) if run.trigger == STARTUP else None
            return self._selective(run)
        except Exception as error:
            logger.exception("jobreaper: broker sweep failed (%s); it is retried next time", error)
            return SweepResult(failed=True)

    def follow(self) -> None:
        """Keep this worker's in-memory revoked set as the table holds it, sweeping nothing
        (read only): what a worker that does not lead the cluster's maintenance does each
        interval, since the leader's sweeps revoke settled jobs' ids and forget them again."""
        with self.db.connect() as conn:
            revoked = revoked_store.active(conn, self.tables)
            settled = revoked_store.active_settled(conn, self.tables)
        workerstate.remember_revoked(revoked - settled)
        workerstate.remember_settled(settled)
        workerstate.keep_settled(settled)

    def _selective(self, run: Settled) -> SweepResult:
        known, settled = self._targets(run)
        # The queues are read once for every target: later sweeps look only for new ones.
        # Workers discard the revoked messages they consume themselves, so merging the ids
        # into this worker's own revoked set keeps enforcing them afterwards.
        targets = known - self._swept
        if not run.dry_run:
            workerstate.remember_revoked(known - settled)
            workerstate.remember_settled(settled)
            workerstate.keep_settled(settled)
        queues = list(self.queues())
        dry = run.dry_run
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)  # fail fast: the timer retries
            driver = conn.transport.driver_type
            result = SweepResult()
            if targets and driver == "redis":
                result.merge(sweep_redis.sweep_lists(conn, queues, targets, dry=dry))
            elif targets and driver == "amqp":
                result.merge(self._amqp(conn, queues, targets, dry))
            elif targets and driver == "filesystem":
                from .broker import filesystem as fs_sweep

                result.merge(fs_sweep.sweep_queues(conn, queues, targets.__contains__, dry_run=dry))
            elif targets:
                logger.debug("jobreaper: no selective sweep for the %s transport", driver)
            gone: set[str] = set()
            if driver == "redis":
                result.merge(
                    sweep_redis.settle_dead_unacked(
                        self.app,
                        conn,
                        grace=self.settings.unacked_grace,
                        timeout=self.settings.ping_timeout,
                        known_live=self._live_nodes(run.view),
                        targets=known,
                        dry=dry,
                    )
                )
                if settled and not dry and not result.partial:
                    # every settled id still revoked, looked for in every queue on the
                    # broker: a message in a queue this worker does not read is not gone
                    gone = sweep_redis.settled_gone(conn, settled, result, queues)
        if not dry and not result.partial:
            self._swept |= targets
        if gone:
            self._forget(gone)
        self._record(run, result)
        return result

    def _forget(self, task_ids: set[str]) -> None:
        """Un-revoke settled jobs' ids whose message is gone: the id may be sent again."""
        with self.db.connect() as conn, conn.begin():
            revoked_store.forget_settled(conn, self.tables, task_ids)
            still = revoked_store.active_settled(conn, self.tables)
        workerstate.keep_settled(still)
        self._swept -= task_ids
        logger.info(
            "jobreaper: %d settled job(s)' message(s) gone; their task ids may run again: %s",
            len(task_ids),
            ", ".join(sorted(task_ids)[:20]),
        )

    def _amqp(self, conn: Any, queues: list[str], targets: set[str], dry: bool) -> SweepResult:
        """RabbitMQ: never in a dry run (reading a queue means taking its messages)."""
        if dry:
            logger.info(
                "jobreaper: [dry run] RabbitMQ queues are not read (that would take and give "
                "back every message); %d revoked/settled task id(s) would be looked for",
                len(targets),
            )
            return SweepResult()
        from . import amqp_holds
        from .broker import amqp as amqp_sweep

        db, tables = self.db, self.tables
        with db.connect() as dbc:
            holds = amqp_holds.load(dbc, tables, queues)
        declared = {
            name: self.app.amqp.queues[name] for name in queues if name in self.app.amqp.queues
        }
        try:
            return amqp_sweep.sweep_queues(
                conn,
                queues,
                targets.__contains__,
                max_deliveries=self.settings.amqp_max_deliveries,
                limits=amqp_sweep.delivery_limits(conn, declared),
                holds=holds,
            )
        finally:
            with db.connect() as dbc, dbc.begin():
                amqp_holds.save(dbc, tables, queues, holds)

    # -- what to remove ---------------------------------------------------------------------

    def _targets(self, run: Settled) -> tuple[set[str], set[str]]:
        """Revoked ids (table, this process, live workers once) plus this run's settled jobs;
        and of those, the ids revoked only because their job was settled."""
        db, tables = self.db, self.tables
        node = run.node
        settled_ids = set(run.task_ids)
        learned = workerstate.revoked_ids() - workerstate.settled_ids()
        if not self._asked_live_revoked:
            self._asked_live_revoked = True
            learned |= self._ask_live_revoked(run.view)
        with db.connect() as conn, conn.begin():
            if not run.dry_run:
                if learned:
                    revoked_store.record(
                        conn, tables, learned, expires=self.settings.revoked_expires, node=node
                    )
                if settled_ids:
                    # a settled job must not run afterwards, wherever its message is (the
                    # settle itself stored them; this covers a settle made without ids)
                    revoked_store.record_settled(
                        conn, tables, settled_ids, expires=self.settings.revoked_expires
                    )
                revoked_store.prune(conn, tables)
            targets = revoked_store.active(conn, tables) | learned | settled_ids
            settled = revoked_store.active_settled(conn, tables) | (settled_ids - learned)
        live = self._live_nodes(run.view)
        if settled_ids and not run.dry_run and run.view.other_live_workers and live:
            # Live jobreaper workers hold them revoked until the message is gone (Celery's
            # own revoke would block the id there for 3 hours, a re-sent task included).
            # Sent to the live workers by name; one that registered since reads them from
            # the table (its startup sweep, or each interval while it does not lead).
            ids = sorted(settled_ids)
            for i in range(0, len(ids), REVOKE_CHUNK):
                broadcast(
                    self.app,
                    "jobreaper_revoke_settled",
                    arguments={"ids": ids[i : i + REVOKE_CHUNK]},
                    destination=live,
                )
        return targets, settled

    def _live_nodes(self, view: LivenessView) -> list[str]:
        nodes = {
            view.incarnation_nodes[i] for i in view.live_incarnations if i in view.incarnation_nodes
        } | view.live_nodes
        if view.me is not None:
            nodes.discard(view.me.node)
        return sorted(nodes)

    def _ask_live_revoked(self, view: LivenessView) -> set[str]:
        """Ask exactly the known live workers, once, for their in-memory revoked ids."""
        nodes = self._live_nodes(view)
        if not nodes:
            return set()
        try:
            replies = broadcast(
                self.app,
                "revoked",
                destination=nodes,
                reply=True,
                limit=len(nodes),
                timeout=self.settings.ping_timeout,
            )
        except Exception as error:
            logger.warning("jobreaper: could not ask live workers for revoked ids (%s)", error)
            return set()
        return {i for reply in replies for ids in reply.values() for i in (ids or ())}

    # -- reconciliation ---------------------------------------------------------------------

    def queued_task_ids(self) -> set[str] | None:
        """Task ids of messages waiting in the queues: on Redis every bound queue (this
        worker's and any other), on the filesystem transport this worker's queue folders.

        ``None`` (unknown) on RabbitMQ and other transports: a queue cannot be read there
        without taking its messages, and a message waiting in one is not "nothing queued".
        """
        queues = list(self.queues())
        with self.app.connection_for_write() as conn:
            driver = conn.transport.driver_type
            if driver == "redis":
                return sweep_redis.queued_ids(conn, queues)
            if driver == "filesystem":
                from .broker import filesystem as fs_sweep

                found = fs_sweep.sweep_queues(conn, queues, lambda _id: True, dry_run=True)
                return {task_id for task_id, _queue in found.removed}
        return None

    # -- purge --------------------------------------------------------------------------------

    def _purge(self, run: Settled) -> SweepResult | None:
        queues = list(self.queues())
        if run.dry_run:
            logger.info("jobreaper: [dry run] would purge queues %s", ", ".join(queues))
            return None
        with self.app.connection_for_write() as conn:
            count = int(self.app.control.purge(connection=conn) or 0)
        logger.info(
            "jobreaper: Purged %d message(s) from %s (jobreaper_queue_cleanup = purge)",
            count,
            ", ".join(queues),
        )
        event = ledger.Event(
            action=PURGED,
            source=BROKER,
            job_id=",".join(queues),
            reason=f"purged {count} message(s)",
            previous_status="queued",
        )
        with self.db.connect() as conn, conn.begin():
            ledger.write(conn, self.tables, [event], now=run.started_at, run_id=run.run_id)
        return SweepResult(purged=count)

    # -- ledger -------------------------------------------------------------------------------

    def _record(self, run: Settled, result: SweepResult) -> None:
        """Log what the sweep did and write its ledger events."""
        settled_ids = run.task_ids
        prefix = "[dry run] would have " if run.dry_run else ""
        events: list[ledger.Event] = []
        for task_id, key in result.removed:
            where = _readable(key)
            why = "its job was settled as failed" if task_id in settled_ids else "revoked"
            events.append(_event(REMOVED, task_id, where, why))
            logger.info(
                "jobreaper: %sremoved message of task %s from %s: %s", prefix, task_id, where, why
            )
        for task_id, key in result.restored:
            where = _readable(key)
            events.append(_event(RESTORED, task_id, where, "unacked by a dead worker"))
            logger.info(
                "jobreaper: %srestored unacked message of task %s to %s (its worker is gone)",
                prefix,
                task_id,
                where,
            )
        for task_id, tag in result.dropped_unacked:
            why = "its job was settled as failed" if task_id in settled_ids else "revoked"
            events.append(_event(DROPPED, task_id, f"unacked {tag}", why))
            logger.info("jobreaper: %sdropped unacked message of task %s: %s", prefix, task_id, why)
        if result.unparsable:
            logger.warning(
                "jobreaper: left %d broker entr(ies) it could not parse untouched",
                result.unparsable,
            )
        if run.dry_run or not events:
            return
        with self.db.connect() as conn, conn.begin():
            ledger.write(conn, self.tables, events, now=run.started_at, run_id=run.run_id)


def _event(action: str, task_id: str, where: str, why: str) -> ledger.Event:
    """The ledger event of one message the sweep acted on (*where*: its queue, as text)."""
    return ledger.Event(
        action=action,
        source=BROKER,
        job_id=task_id,
        reason=why,
        task_id=task_id,
        previous_status=where,
    )


def _readable(key: str) -> str:
    """A Redis priority list key as text (kombu separates the priority with ``\\x06\\x16``)."""
    queue, sep, step = key.partition("\x06\x16")
    return f"{queue} (priority {step})" if sep else key


def worker_queues(app: Any) -> Callable[[], list[str]]:
    """This worker's queues (``-Q``/``-X`` applied), or every known queue outside a worker."""

    def queues() -> list[str]:
        consume_from = app.amqp.queues.consume_from
        return sorted(consume_from or app.amqp.queues)

    return queues
