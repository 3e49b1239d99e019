"""The maintenance lease on PostgreSQL, MariaDB and SQLite: one holder among racing workers,
renewal, takeover after expiry with a new generation, and a woken holder fenced out."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from jobtables import SEED_SOURCE, ago, create_seed
from sqlalchemy import Table, create_engine, insert, select
from support import make_app, wait_until

from celery_jobreaper import lease as lease_mod
from celery_jobreaper.database import Database
from celery_jobreaper.lease import Lease, LeaseLost
from celery_jobreaper.liveness import Incarnation
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.service import ReaperService
from celery_jobreaper.settings import Settings


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database.from_settings(Settings(database_url=db_url))
    create_all(database.engine, tables)
    yield database
    database.dispose()


def _contender(db: Database, timeout: float = 60.0) -> Lease:
    holder = uuid.uuid4().hex
    return Lease(db, tables, holder=holder, node=f"w-{holder[:6]}@h", timeout=timeout)


def _expired(db: Database) -> bool:
    """Read with a plain engine of its own (on SQLite, no write lock is taken to read)."""
    engine = create_engine(db.engine.url)
    try:
        with engine.connect() as conn:
            state = lease_mod.read(conn, tables)
    finally:
        engine.dispose()
    return state is not None and not state.live


def test_racing_contenders_exactly_one_holds_then_renews_with_the_same_generation(
    db: Database,
) -> None:
    contenders = [_contender(db) for _ in range(6)]
    start = threading.Barrier(len(contenders))
    errors: list[BaseException] = []

    def race(lease: Lease) -> None:
        try:
            start.wait()
            lease.acquire()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    leaders = [c for c in contenders if c.leads]
    assert len(leaders) == 1
    leader = leaders[0]
    assert leader.generation == 1
    with db.connect() as conn:
        state = lease_mod.read(conn, tables)
    assert state is not None and state.holder == leader.holder and state.generation == 1
    first_expiry = state.expires_at

    # Everyone tries again (the next heartbeat): the holder renews, nobody else takes it.
    for c in contenders:
        c.acquire()
    assert [c for c in contenders if c.leads] == [leader]
    with db.connect() as conn:
        renewed = lease_mod.read(conn, tables)
    assert renewed is not None
    assert (renewed.holder, renewed.generation) == (leader.holder, 1)
    assert renewed.expires_at > first_expiry
    with db.connect() as conn, conn.begin():
        assert leader.fence(conn) == 1


def test_expired_lease_taken_over_with_a_new_generation_and_the_woken_holder_is_fenced(
    db: Database,
) -> None:
    paused = _contender(db, timeout=1.0)
    other = _contender(db, timeout=60.0)
    paused.acquire()
    assert paused.generation == 1
    other.acquire()
    assert not other.leads  # held and live

    # The holder is paused (it renews nothing) until its lease has expired on the database's
    # clock; another worker takes it over.
    wait_until(lambda: _expired(db), 30, "the lease to expire")
    other.acquire()
    assert other.generation == 2

    # The paused holder wakes up still believing it leads: its first leader-only write
    # transaction is refused, and it is told it lost.
    assert paused.leads
    with pytest.raises(LeaseLost, match="holds generation 2"), db.connect() as conn, conn.begin():
        paused.fence(conn)
    assert not paused.leads
    # Its next heartbeat cannot renew (the lease is another's now), nor take it.
    paused.acquire()
    assert not paused.leads
    with db.connect() as conn:
        state = lease_mod.read(conn, tables)
    assert state is not None and (state.holder, state.generation) == (other.holder, 2)
    with db.connect() as conn, conn.begin():
        assert other.fence(conn) == 2


def test_a_holders_own_expired_lease_is_not_acted_on_and_is_taken_back_with_a_new_generation(
    db: Database,
) -> None:
    alone = _contender(db, timeout=1.0)
    alone.acquire()
    wait_until(lambda: _expired(db), 30, "the lease to expire")
    with pytest.raises(LeaseLost, match="expired"), db.connect() as conn, conn.begin():
        alone.fence(conn)
    alone.acquire()
    assert alone.generation == 2


def test_no_takeover_slips_into_a_fenced_transaction_in_flight(db: Database) -> None:
    """The fence locks the lease row: a takeover cannot slip between the check and the commit
    of a leader-only write. On PostgreSQL and MariaDB the takeover does not wait for that lock
    either (``NOWAIT``): it runs in the heartbeat thread, and a leader paused inside such a
    transaction must not stop every other worker's heartbeat -- it is refused and tried again
    at the next heartbeat. On SQLite every writer waits for the file lock (heartbeats too)."""
    leader = _contender(db, timeout=1.0)
    other = _contender(db)
    leader.acquire()
    done = threading.Event()
    errors: list[BaseException] = []

    def take_over() -> None:
        try:
            other.acquire()
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            done.set()

    sqlite = db.engine.dialect.name == "sqlite"
    with db.connect() as conn:
        tx = conn.begin()
        assert leader.fence(conn) == 1
        wait_until(lambda: _expired(db), 30, "the lease to expire")
        contender = threading.Thread(target=take_over)
        contender.start()
        if sqlite:
            assert not done.wait(1.0)  # waits for the fenced transaction's file lock
        else:
            assert done.wait(30.0), "the takeover waited for the fenced transaction's lock"
            assert errors == [] and other.generation is None, "taken inside the transaction"
        tx.commit()
    contender.join()
    assert errors == []
    if not sqlite:
        other.acquire()  # its next heartbeat
    assert other.generation == 2
    with pytest.raises(LeaseLost), db.connect() as conn, conn.begin():
        leader.fence(conn)


def test_release_lets_another_worker_lead_at_once(db: Database) -> None:
    leaving = _contender(db)
    staying = _contender(db)
    leaving.acquire()
    staying.acquire()
    assert leaving.leads and not staying.leads
    leaving.release()
    assert not leaving.leads
    staying.acquire()
    assert staying.generation == 2


# --- the lease in the service: a woken leader's periodic reap is fenced -----------------------


def _worker(
    app: Celery, db: Database, node: str, settings: Settings | None = None
) -> ReaperService:
    """An in-process worker's service (real database and broker; no Celery worker needed)."""
    settings = settings or Settings.from_app(app)
    me = Incarnation.new(node)
    lease = Lease(db, tables, holder=me.id, node=node, timeout=settings.lease_timeout)
    reaper = Reaper(app, settings, db, me=me, fence=lease.fence)
    return ReaperService(reaper, me, lease=lease)


def test_a_woken_leaders_periodic_reap_writes_nothing_and_the_new_leader_settles(
    db_url: str, unique: str
) -> None:
    app = make_app(
        db_url,
        sources=[{**SEED_SOURCE, "owner": "owner"}],
        heartbeat_interval=0.5,
        heartbeat_timeout=30,
        lease_timeout=1,
    )
    db = Database.from_settings(Settings.from_app(app))
    table = create_seed(db.engine, [], owner=True)
    a = _worker(app, db, f"a-{unique}@h")
    b = _worker(app, db, f"b-{unique}@h")
    try:
        a.startup()
        b.startup()
        a.beat()
        b.beat()
        assert a.lease is not None and b.lease is not None
        assert a.lease.generation == 1 and not b.lease.leads
        # A is paused: no heartbeat renews its lease; once expired, B takes it at its beat.
        wait_until(lambda: _expired(db), 30, "A's lease to expire")
        b.beat()
        assert b.lease.generation == 2
        # Meanwhile a job of a worker never registered, an hour old, waits to be settled.
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
        # A wakes up and its timer ticks before its heartbeat: it still believes it leads.
        assert a.lease.leads
        a.periodic()
        assert not a.lease.leads
        assert _status(db, table) == "running"
        assert _periodic_runs(db) == []
        # B's tick settles it, in a run of its own.
        b.periodic()
        assert _status(db, table) == "failed"
        runs = _periodic_runs(db)
        assert [r.incarnation_id for r in runs] == [b.me.id]
        with db.connect() as conn:
            events = conn.execute(select(tables.events.c.run_id)).scalars().all()
        assert events == [runs[0].id]
        # A nothing-found cycle of the leader writes no runs row.
        b.periodic()
        assert len(_periodic_runs(db)) == 1
    finally:
        db.dispose()


def _status(db: Database, table: Table) -> str:
    with db.connect() as conn:
        return str(conn.execute(select(table.c.status)).scalar())


def _periodic_runs(db: Database) -> list[Any]:
    r = tables.runs
    with db.connect() as conn:
        return list(conn.execute(select(r).where(r.c.trigger == "periodic").order_by(r.c.id)))
