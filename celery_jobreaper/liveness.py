"""Worker incarnations, heartbeats, and the two-signal rule that decides who is dead."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import false, insert, or_, select, update
from sqlalchemy.engine import Connection

from .clock import db_now, db_utcnow
from .incarnation import Incarnation
from .livenessview import LivenessDraft, LivenessView
from .ping import Pinger
from .schema import JobReaperTables
from .vocabulary import DEAD, DRAINING, RUNNING, STOPPED

logger = logging.getLogger(__name__)

__all__ = ["Incarnation", "Liveness", "LivenessView", "Pinger", "mark_dead", "newcomers"]


class Liveness:
    """Reads and writes the incarnations table and judges which owners are dead."""

    def __init__(
        self,
        tables: JobReaperTables,
        *,
        heartbeat_timeout: float,
        heartbeat_interval: float | None = None,
    ) -> None:
        self.t = tables.incarnations
        self.heartbeat_timeout = timedelta(seconds=heartbeat_timeout)
        interval = heartbeat_timeout / 2 if heartbeat_interval is None else heartbeat_interval
        #: an incarnation that has not heartbeated for this long is quiet (two beats missed)
        self.quiet_after = min(timedelta(seconds=2 * interval), self.heartbeat_timeout)

    def register(self, conn: Connection, me: Incarnation) -> None:
        """Record *me* as running."""
        conn.execute(
            insert(self.t).values(
                id=me.id,
                node=me.node,
                host=me.host,
                pid=me.pid,
                started_at=db_now(conn.dialect.name),
                heartbeat_at=db_now(conn.dialect.name),
                state=RUNNING,
            )
        )

    def heartbeat(self, conn: Connection, me: Incarnation, *, state: str | None = None) -> bool:
        """Refresh my heartbeat (and state); False if the row was gone or declared dead."""
        now = db_now(conn.dialect.name)  # the database's clock, not this host's
        row = conn.execute(select(self.t.c.state).where(self.t.c.id == me.id)).first()
        if row is None:
            self.register(conn, me)
            return False
        values: dict[str, Any] = {"heartbeat_at": now}
        revived = row.state == DEAD
        if state is not None:
            values["state"] = state
            if state == STOPPED:
                values["stopped_at"] = now
        elif revived:
            values["state"] = RUNNING
        conn.execute(update(self.t).where(self.t.c.id == me.id).values(**values))
        if revived:
            logger.warning(
                "jobreaper: this worker (%s) was declared dead by another reaper while it was "
                "unresponsive; its jobs of that time were settled. Heartbeats resume now.",
                me.node,
            )
        return not revived

    def duplicates_of(self, conn: Connection, me: Incarnation) -> list[str]:
        """Other incarnations of my node name that heartbeated after I started: live duplicates."""
        my_start = conn.execute(select(self.t.c.started_at).where(self.t.c.id == me.id)).scalar()
        if my_start is None:
            return []
        rows = conn.execute(
            select(self.t.c.id, self.t.c.host, self.t.c.pid).where(
                self.t.c.node == me.node,
                self.t.c.id != me.id,
                self.t.c.state.in_((RUNNING, DRAINING)),
                self.t.c.heartbeat_at > my_start + timedelta(seconds=1),
            )
        )
        return [f"{r.host} pid {r.pid}" for r in rows]

    def assess(
        self,
        conn: Connection,
        *,
        me: Incarnation | None,
        incarnation_ids: Iterable[str] = (),
        nodes: Iterable[str] = (),
        ping: Pinger | None,
        ping_timeout: float,
        now: datetime | None = None,
        confirm_alone: bool = False,
    ) -> LivenessView:
        """Judge the incarnations and node names that own candidate jobs.

        A worker is dead on two signals only: a heartbeat older than the timeout (or a clean
        stop) **and** no reply to one ping of exactly the suspects. This worker's own earlier
        incarnations are dead at once, unless another live process answers for the node name.

        *confirm_alone* (jobs without owner are to be judged): when the table shows no other
        live incarnation, that is not enough to conclude that no other worker runs — one marked
        dead during a pause may have woken up and taken a job before its next heartbeat (a
        ``dead`` row is not pinged as a suspect), and a worker not registered yet may answer.
        The one ping of the run then goes to every worker (its replies also answer for the
        suspects): any reply but this process's own counts as another live worker, and a ping
        that fails leaves the question open (at least one other worker is assumed).
        """
        now = now or db_utcnow(conn)  # the database's clock: heartbeats are written with it
        view = LivenessDraft(me=me, now=now)
        wanted_ids = set(incarnation_ids)
        wanted_nodes = {n for n in nodes if n}
        rows = list(
            conn.execute(
                select(self.t).where(
                    or_(
                        self.t.c.state.in_((RUNNING, DRAINING)),
                        self.t.c.id.in_(wanted_ids) if wanted_ids else false(),
                        self.t.c.node.in_(wanted_nodes) if wanted_nodes else false(),
                    )
                )
            )
        )
        fresh_after = now - self.heartbeat_timeout
        suspects: dict[str, Any] = {}
        newest_live: dict[str, datetime] = {}
        own_earlier: list[Any] = []
        for row in rows:
            view.incarnation_nodes[row.id] = row.node
            view.seen_heartbeats[row.id] = row.heartbeat_at
            if me is not None and row.id == me.id:
                view.live_incarnations.add(row.id)
                continue
            if me is not None and row.node == me.node:
                if confirm_alone or row.id in wanted_ids or row.node in wanted_nodes:
                    # judged when it owns candidate jobs, or when jobs without owner are:
                    # a live duplicate of my name may be running them
                    own_earlier.append(row)
                continue
            # A verdict of death is not forever: a worker found dead during a pause or a
            # partition may come back, so a "dead" row is judged again like any other.
            fresh = row.heartbeat_at >= fresh_after and row.state != STOPPED
            if fresh:
                view.live_incarnations.add(row.id)
                newest_live[row.node] = max(
                    newest_live.get(row.node, row.started_at), row.started_at
                )
            elif row.state == STOPPED:
                view.dead_incarnations[row.id] = f"{row.node}, which stopped at {row.stopped_at}"
            else:
                # Stale, owning candidate jobs or not: it may be running jobs without owner
                # (a worker woken from a pause), so it is live until silence proves it dead.
                suspects[row.id] = row

        to_ping = {r.node for r in suspects.values()}
        my_row = next((r for r in rows if me is not None and r.id == me.id), None)
        my_start = my_row.started_at if my_row is not None else (me.started_at if me else now)
        quiet_own: list[Any] = []
        for row in own_earlier:
            # Same node name, another incarnation: dead only on two signals too. A heartbeat
            # after my start is a live duplicate (a busy -P solo one does not answer pings);
            # a recent one is undecided until it has been quiet for two heartbeat intervals.
            quiet_for = now - row.heartbeat_at
            if row.state == STOPPED:
                view.dead_incarnations[row.id] = _earlier(row, f"which stopped at {row.stopped_at}")
            elif row.heartbeat_at > my_start and quiet_for < self.quiet_after:
                view.refused_nodes[row.node] = (
                    f"another live worker uses this node name {row.node!r} (incarnation on "
                    f"{row.host} pid {row.pid}, heartbeat {_seconds(quiet_for)} ago, after this "
                    "worker started); node names must be unique (-n)"
                )
                view.live_incarnations.add(row.id)
            elif quiet_for < self.quiet_after:
                wait = (self.quiet_after - quiet_for).total_seconds()
                view.recheck_in = max(view.recheck_in or 0.0, wait)
                view.undecided[row.node] = (
                    f"an earlier start of this node name heartbeated {_seconds(quiet_for)} ago; "
                    "judged once it has been quiet for two heartbeat intervals"
                )
                view.live_incarnations.add(row.id)
            else:
                quiet_own.append(row)
        if me is not None and quiet_own:
            to_ping.add(me.node)  # does another process answer to my node name?
        known_nodes = {row.node for row in rows}
        to_ping |= {n for n in wanted_nodes if n not in known_nodes and not view.node_is_me(n)}
        # Alone by the table: whether any other worker answers decides (one broadcast, which
        # answers for the suspects too).
        everyone = confirm_alone and not (view.live_incarnations - {me.id if me else ""})
        replied: set[str] = set()
        if (to_ping or everyone) and ping is not None:
            try:
                replied = ping(None if everyone else sorted(to_ping), ping_timeout)
            except Exception as error:  # broker down: silence proves nothing
                view.ping_failed = f"{type(error).__name__}: {error}"
                logger.warning(
                    "jobreaper: could not ping %s (%s); leaving their jobs alone",
                    "the workers" if everyone else f"suspects {sorted(to_ping)}",
                    view.ping_failed,
                )
        elif to_ping or everyone:
            view.ping_failed = "no broker to ping through"
        view.live_nodes |= replied - ({me.node} if me is not None else set())

        for row in quiet_own:
            if view.ping_failed is not None:
                view.undecided[row.node] = f"could not ping this node name ({view.ping_failed})"
                view.live_incarnations.add(row.id)
            elif me is not None and me.node in replied:
                view.refused_nodes[me.node] = (
                    f"another live worker answers to this node name {me.node!r} "
                    f"(incarnation on {row.host} pid {row.pid}); node names must be unique (-n)"
                )
                view.live_incarnations.add(row.id)
            else:
                view.dead_incarnations[row.id] = _earlier(row, "no heartbeat, no reply to ping")
                view.dead_heartbeats[row.id] = row.heartbeat_at
        for inc_id, row in suspects.items():
            stale = f"last heartbeat {row.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC"
            if view.ping_failed is not None:
                view.live_incarnations.add(inc_id)  # unknown: treat as alive
            elif row.node not in replied:
                view.dead_incarnations[inc_id] = (
                    f"{row.node}, which stopped ({stale}, no reply to ping)"
                )
                view.dead_heartbeats[inc_id] = row.heartbeat_at
            elif newest_live.get(row.node, row.started_at) > row.started_at:
                view.dead_incarnations[inc_id] = (
                    f"{row.node}, an earlier start superseded by a newer live one ({stale})"
                )
                view.dead_heartbeats[inc_id] = row.heartbeat_at
            else:
                view.live_incarnations.add(inc_id)

        # Every incarnation not proven dead may be running jobs without owner: a live
        # duplicate of my node name, an undecided earlier start, a suspect that answered.
        view.other_live_workers = len(view.live_incarnations - ({me.id} if me else set()))
        if everyone and not view.other_live_workers:
            # Any reply is another process (this one's own is never counted); no answer to
            # ask for is no verdict: a worker marked dead may be back and running a job.
            view.other_live_workers = len(replied) if view.ping_failed is None else 1
        self._judge_nodes(view, rows, wanted_nodes, replied)
        return view.freeze()

    def _judge_nodes(
        self, view: LivenessDraft, rows: list[Any], wanted: set[str], replied: set[str]
    ) -> None:
        by_node: dict[str, list[Any]] = {}
        for row in rows:
            by_node.setdefault(row.node, []).append(row)
        for node in wanted:
            if node in view.refused_nodes or view.node_is_me(node):
                continue  # my own node name is judged per job (started before this incarnation)
            incs = by_node.get(node, [])
            if node in replied or any(r.id in view.live_incarnations for r in incs):
                view.live_nodes.add(node)
            elif incs and view.ping_failed is None:
                last = max(incs, key=lambda r: r.heartbeat_at)
                view.dead_nodes[node] = view.dead_incarnations.get(
                    last.id, f"{node}, which stopped (no heartbeat, no reply to ping)"
                )
            elif not incs and view.ping_failed is None:
                # Never registered: no heartbeat where a jobreaper worker would have one, and
                # no reply. Dead for its jobs older than the heartbeat timeout (the planner).
                view.unregistered_silent.add(node)


def newcomers(conn: Connection, tables: JobReaperTables, view: LivenessView) -> list[str]:
    """Incarnations running now that *view* did not see, or saw with another heartbeat.

    Read in the apply transaction, for verdicts that rest on "no other live worker" (made from
    a view that counted none): a worker that registered since the view was made (a new
    incarnation id), or one that heartbeated since (back from a pause, its ``dead`` mark
    undone), would make the verdict wrong. Compared by incarnation id and the stored
    heartbeat value, not by time. Returns ``node (host pid)`` of each.
    """
    t = tables.incarnations
    mine = view.me.id if view.me is not None else None
    rows = conn.execute(
        select(t.c.id, t.c.node, t.c.host, t.c.pid, t.c.heartbeat_at).where(
            t.c.state.in_((RUNNING, DRAINING))
        )
    )
    return [
        f"{r.node} ({r.host} pid {r.pid})"
        for r in rows
        if r.id != mine and view.seen_heartbeats.get(r.id) != r.heartbeat_at
    ]


def _earlier(row: Any, why: str) -> str:
    return f"{row.node} (an earlier start of this worker, pid {row.pid} on {row.host}; {why})"


def _seconds(delta: timedelta) -> str:
    return f"{max(delta.total_seconds(), 0.0):.1f} s"


def mark_dead(
    conn: Connection, tables: JobReaperTables, view: LivenessView, *, skip_locked: bool = False
) -> None:
    """Record incarnations judged dead by heartbeat and silence, so later reaps need not
    ping them again (they are judged again only if they own new jobs).

    Compare-and-set on the heartbeat the verdict was made on: an incarnation that heartbeated
    since (a paused worker that woke up) is not marked. With *skip_locked* (databases with
    ``SKIP LOCKED``) a row another transaction holds is left as it is: its owner is writing
    it (a heartbeat, a tracker's vouch) — a sign of life — and a reaper never waits on it (a
    process stopped mid-write would hold the reaper, its lease and other workers' starts).
    """
    t = tables.incarnations
    ids = [i for i in view.dead_heartbeats if i not in view.live_incarnations]
    if not ids:
        return
    if skip_locked:
        free = set(
            conn.execute(
                select(t.c.id).where(t.c.id.in_(ids)).with_for_update(skip_locked=True)
            ).scalars()
        )
        ids = [i for i in ids if i in free]
    for inc_id in ids:
        conn.execute(
            update(t)
            .where(
                t.c.id == inc_id,
                t.c.state.in_((RUNNING, DRAINING)),
                t.c.heartbeat_at == view.dead_heartbeats[inc_id],
            )
            .values(state=DEAD)
        )
