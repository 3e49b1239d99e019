"""Adversarial review (h-review): the maintenance lease is taken on the heartbeat connection,
after the heartbeat, in the heartbeat thread. A takeover of an expired lease is an ``UPDATE``
that waits for the row lock of the old leader's fenced transaction. A leader paused in the
middle of such a transaction (SIGSTOP, VM freeze, long GC) therefore stops the *heartbeats of
every other worker* once its lease has expired: each one is stuck in ``Lease.acquire``. A busy
``-P solo`` worker does not answer pings either, so any reaper that is not stuck (a starting
worker, ``celery jobreaper reap``, a remote reap) finds a stale heartbeat and no reply and
settles the live worker's job (DESIGN §2.1). Real databases; the paused leader's transaction
is the one its reaper opens (``Lease.fence`` first); the busy worker's ping is not answered.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import create_engine, insert, select
from support import make_app, wait_until
from test_lease import _worker

from celery_jobreaper import lease as lease_mod
from celery_jobreaper.clock import db_utcnow
from celery_jobreaper.database import Database
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import tables
from celery_jobreaper.settings import Settings


@pytest.mark.parametrize("db_url", ["postgresql", "mariadb"], indirect=True)
def test_a_paused_leader_mid_transaction_does_not_stop_other_workers_heartbeats(
    db_url: str, unique: str
) -> None:
    app = make_app(
        db_url,
        sources=[{**SEED_SOURCE, "owner": "owner"}],
        heartbeat_interval=0.3,
        heartbeat_timeout=2,
        lease_timeout=1,
    )
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    table = create_seed(db.engine, [], owner=True)
    leader = _worker(app, db, f"leader-{unique}@h")
    busy = _worker(app, db, f"busy-{unique}@h")
    peek = create_engine(db.engine.url)  # reads without taking any lock
    fenced = db.connect()
    tx = None
    try:
        leader.startup()
        leader.beat()
        assert leader.lease is not None and leader.lease.generation == 1
        busy.startup()
        busy.beat()
        assert busy.lease is not None and not busy.lease.leads
        busy.start_threads()  # its heartbeat thread (and timer) run as in a worker, all along
        # The busy -P solo worker runs a job of its own (owner column: its node name).
        with db.engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    job_id="live",
                    job_type="library_scan",
                    status="running",
                    started_at=ago(minutes=1),
                    owner=busy.me.node,
                )
            )
        # The leader's periodic reap opens a write transaction (fence first) and is paused.
        tx = fenced.begin()
        assert leader.lease.fence(fenced) == 1

        def lease_expired_at() -> datetime | None:
            with peek.connect() as conn:
                state = lease_mod.read(conn, tables)
            return state.expires_at if state is not None and not state.live else None

        expired_at = wait_until(lease_expired_at, 30, "the paused leader's lease to expire")

        inc = tables.incarnations

        def settled_either_way() -> bool:
            """Its heartbeat went stale (stuck), or kept landing a full timeout past expiry."""
            with peek.connect() as conn:
                now = db_utcnow(conn)
                beat = conn.execute(
                    select(inc.c.heartbeat_at).where(inc.c.id == busy.me.id)
                ).scalar_one()
            stale = (now - beat).total_seconds() > settings.heartbeat_timeout
            fresh = (beat - expired_at).total_seconds() > settings.heartbeat_timeout
            return bool(stale or fresh)

        wait_until(settled_either_way, 60, "the busy worker's heartbeat to be judged")
        # Another reaper (a worker starting, `celery jobreaper reap`): the busy worker does
        # not answer its ping.
        silent = Reaper(
            app, settings, db, ping=lambda nodes, timeout: set(), ask=lambda n, ids, t: set()
        )
        silent.run("manual")
        with peek.connect() as conn:
            status = conn.execute(select(table.c.status)).scalar_one()
        assert status == "running"  # the busy worker is alive: its job is never settled
    finally:
        if tx is not None:
            tx.rollback()
        fenced.close()
        busy.stop()
        peek.dispose()
        db.dispose()


def test_a_draining_worker_does_not_take_the_lease_back(db_url: str, unique: str) -> None:
    app = make_app(
        db_url, sources=[], heartbeat_interval=0.5, heartbeat_timeout=30, lease_timeout=30
    )
    db = Database.from_settings(Settings.from_app(app))
    a = _worker(app, db, f"a-{unique}@h")
    b = _worker(app, db, f"b-{unique}@h")
    try:
        a.startup()
        b.startup()
        a.beat()
        b.beat()
        assert a.lease is not None and b.lease is not None
        assert a.lease.generation == 1 and not b.lease.leads
        a.drain()  # warm shutdown: stop reaping, give the lease up, keep heartbeating
        assert not a.lease.leads
        a.beat()  # A's heartbeat thread beats first (tasks still finishing)
        b.beat()
        assert not a.lease.leads
        assert b.lease.leads  # a worker that reaps leads the cluster's maintenance
    finally:
        a.stop()
        b.stop()
        db.dispose()


def test_a_dry_run_worker_leading_does_not_stop_the_clusters_reaping(
    db_url: str, unique: str
) -> None:
    app = make_app(
        db_url,
        sources=[{**SEED_SOURCE, "owner": "owner"}],
        heartbeat_interval=0.5,
        heartbeat_timeout=30,
        lease_timeout=30,
    )
    db = Database.from_settings(Settings.from_app(app))
    table = create_seed(db.engine, [], owner=True)
    # A worker started with --jobreaper-dry-run (the step's override), and a normal one.
    preview = _worker(app, db, f"preview-{unique}@h", Settings.from_app(app, dry_run=True))
    normal = _worker(app, db, f"normal-{unique}@h")
    try:
        preview.startup()
        normal.startup()
        preview.beat()  # the dry-run worker's heartbeat comes first: it leads
        normal.beat()
        # A job of a worker never registered, an hour old: a ghost to settle.
        with db.engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    job_id="ghost",
                    job_type="library_scan",
                    status="running",
                    started_at=ago(hours=1),
                    owner=f"ghost-{unique}@h",
                )
            )
        # Both timers tick (a few times): the cluster's periodic reap settles the ghost.
        for _ in range(2):
            preview.periodic()
            normal.periodic()
            preview.beat()
            normal.beat()
        with db.connect() as conn:
            assert conn.execute(select(table.c.status)).scalar_one() == "failed"
    finally:
        preview.stop()
        normal.stop()
        db.dispose()
