"""The background side of a worker: heartbeats and periodic reaps, in real threads of their own
(also under gevent: see :mod:`celery_jobreaper.native`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .clock import monotonic
from .incarnation import Incarnation
from .lease import Lease
from .liveness import Liveness
from .native import Loop
from .prune_cycle import PruneCycle
from .reaper import Reaper
from .remote import RemoteReaps
from .revoked import RevokedSync
from .vocabulary import DRAINING, LOCAL, PERIODIC, STARTUP, STOPPED

logger = logging.getLogger(__name__)

#: Seconds after ``heartbeat_interval`` that the follow-up reap of a pool process death runs.
FOLLOW_UP_MARGIN = 0.5


class ReaperService:
    """Registers this worker's incarnation, heartbeats it, and reaps on a timer.

    With a *lease* (:mod:`celery_jobreaper.lease`), the periodic reap is the cluster's: each
    heartbeat takes or renews the lease (when *lead*), and a timer tick reaps only while this
    worker leads (the reaper fences each of its write transactions with the same lease).
    Every worker still runs its own startup reap, and a ``local`` reap after one of its pool
    processes died. Without a lease every worker reaps on its timer.
    """

    def __init__(
        self,
        reaper: Reaper,
        me: Incarnation,
        *,
        reaps: bool = True,
        revoked_sync: RevokedSync | None = None,
        remote: RemoteReaps | None = None,
        prune: PruneCycle | None = None,
        lease: Lease | None = None,
        lead: bool = True,
        follow: Callable[[], None] | None = None,
    ) -> None:
        self.reaper = reaper
        #: False: register and heartbeat only (``--without-jobreaper``, ``jobreaper_enabled``)
        self.reaps = reaps
        self.me = me
        self.settings = reaper.settings
        self.liveness: Liveness = reaper.liveness
        self.registered = False
        self._warned_duplicates: set[str] = set()
        #: copies this worker's in-memory revoked ids to the table on every heartbeat
        self.revoked_sync = revoked_sync
        #: reaps asked for by remote control (``control jobreaper_reap``), in their own thread
        self.remote = remote
        #: prunes on the leader every ``jobreaper_prune_interval`` seconds, in its own thread
        self.prune = prune
        #: the cluster's maintenance lease (``None``: this worker reaps on its timer alone)
        self.lease = lease
        #: whether this worker tries to take the lease (``jobreaper_lead``); a dry-run worker
        #: never does: while it led, every periodic reap of the cluster would be dry
        self.lead = lead and not self.settings.dry_run
        #: whether the startup reap succeeded (else the first tick runs it, as a local reap)
        self.started = False
        #: each tick of a worker that does not lead (or not now): keep its revoked set as the
        #: table holds it (:meth:`celery_jobreaper.sweep.BrokerSweep.follow`)
        self.follow = follow
        #: until this monotonic time, ticks of a worker that does not lead run local reaps
        #: (a pool process died: the reap now and its follow-up, see :meth:`reap_soon`)
        self._local_until = 0.0
        #: warm shutdown began: the lease was given up and is not taken again
        self._draining = False
        self._heart = Loop("jobreaper-heartbeat", self.settings.heartbeat_interval, self.beat)
        self._timer = Loop("jobreaper-reaper", self.settings.interval, self.periodic)

    def register(self) -> None:
        """Create this incarnation's row (once)."""
        if self.registered:
            return
        self.reaper.prepare_tables()
        with self.reaper.db.connect() as conn, conn.begin():
            self.liveness.register(conn, self.me)
        self.registered = True

    def startup(self) -> None:
        """Register and run the startup reap, in the calling thread (raises on failure)."""
        self.register()
        if self.reaps:
            self.reaper.run(STARTUP)
        self.started = True

    def start_threads(self) -> None:
        """Start heartbeating and periodic reaping."""
        self._heart.start()
        if self.reaps:
            self._timer.start()
            if self.remote is not None:
                self.remote.start()
            if self.prune is not None:
                self.prune.start()

    def beat(self, state: str | None = None) -> None:
        """One heartbeat (registering first if the database was down at start)."""
        if not self.registered:
            self.register()
            return
        with self.reaper.db.connect() as conn:
            with conn.begin():
                self.liveness.heartbeat(conn, self.me, state=state)
                duplicates = self.liveness.duplicates_of(conn, self.me)
            if state is None:
                # the lease in a transaction of its own (a takeover may wait for the leader's
                # fenced transaction: the heartbeat is committed first), on the same connection
                self._contend(conn)
        if self.revoked_sync is not None:
            self.revoked_sync.sync()
        for dup in duplicates:
            if dup not in self._warned_duplicates:
                self._warned_duplicates.add(dup)
                logger.error(
                    "jobreaper: another live worker uses this node name %s (%s); "
                    "jobreaper refuses to settle jobs for that name. Give each worker a "
                    "unique name with -n.",
                    self.me.node,
                    dup,
                )

    def _contend(self, conn: Any) -> None:
        """Take or renew the maintenance lease (after a heartbeat); reap at once on taking it."""
        if self.lease is None or not self.reaps or not self.lead or self._draining:
            return
        was = self.lease.generation
        self.lease.acquire(conn)
        now = self.lease.generation
        if now is not None and now != was and self._timer.is_alive():
            self._timer.kick()  # a new leader: the cluster's reap now, not an interval later

    def periodic(self) -> None:
        """One timer tick: the cluster's periodic reap if this worker leads (or no lease is
        used); a ``local`` reap if one of its pool processes died, or if its startup reap never
        succeeded (the database was down at start): that one judges the same jobs, but as
        what it is, a reap of a worker already consuming (no purge of its queues)."""
        if not self.registered:
            self.register()
        local = monotonic() <= self._local_until
        if self.lease is None or self.lease.leads:
            self.reaper.run(PERIODIC)  # fenced by the lease: a lost lease stops it
            self.started = True
            if self.lease is None or self.lease.leads:
                return
        if local or not self.started:
            self.reaper.run(LOCAL)
            self.started = True
        elif self.follow is not None:
            self.follow()

    def reap_soon(self) -> None:
        """A pool process died and the worker settled its task: reap now; never blocks.

        The planner leaves a row of this worker's current start younger than
        ``heartbeat_interval`` (its task may be taken right now), so a second reap follows
        once such a row of the dead process's task is older than that
        (:data:`FOLLOW_UP_MARGIN` seconds later still).
        """
        if self.reaps and self._timer.is_alive():
            follow_up = self.settings.heartbeat_interval + FOLLOW_UP_MARGIN
            self._local_until = monotonic() + follow_up + FOLLOW_UP_MARGIN
            self._timer.kick()
            self._timer.kick_later(follow_up)

    def drain(self) -> None:
        """Warm shutdown began: stop reaping, keep heartbeating, say we are draining."""
        self._draining = True
        self._timer.stop()
        self._stop_helpers()
        self._release()
        self._mark(DRAINING)

    def stop(self) -> None:
        """Stop both threads and mark the incarnation stopped."""
        self._timer.stop()
        self._heart.stop()
        self._stop_helpers()
        wait = max(5.0, self.settings.connect_timeout + 1)
        for loop in (self._timer, self._heart):
            if not loop.is_current():
                loop.join(timeout=wait)
        for helper in (self.remote, self.prune):
            if helper is not None:
                helper.join(timeout=wait)
        self._release()
        self._mark(STOPPED)
        self.reaper.db.dispose()
        if self.reaper.webhooks is not None:
            self.reaper.webhooks.close(timeout=self.settings.webhook_timeout)

    def _stop_helpers(self) -> None:
        for helper in (self.remote, self.prune):
            if helper is not None:
                helper.stop()

    def _release(self) -> None:
        """Give the lease up (warm or cold shutdown): another worker leads at its next beat."""
        if self.lease is not None:
            self.lease.release()

    def _mark(self, state: str) -> None:
        if not self.registered:
            return
        try:
            self.beat(state)
        except Exception:
            logger.exception("jobreaper: could not mark this worker %s", state)
