"""The maintenance lease on PostgreSQL, MariaDB and SQLite: one holder among racing workers,
renewal, takeover after expiry with a new generation, and a woken holder fenced out."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from support import wait_until

from celery_jobreaper import lease as lease_mod
from celery_jobreaper.database import Database
from celery_jobreaper.lease import Lease, LeaseLost
from celery_jobreaper.schema import create_all, tables
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


def test_a_takeover_waits_for_the_fenced_transaction_in_flight(db: Database) -> None:
    """The fence locks the lease row: a takeover cannot slip between the check and the commit
    of a leader-only write."""
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

    with db.connect() as conn:
        tx = conn.begin()
        assert leader.fence(conn) == 1
        wait_until(lambda: _expired(db), 30, "the lease to expire")
        contender = threading.Thread(target=take_over)
        contender.start()
        # The takeover waits on the lock of the fenced transaction still open.
        assert not done.wait(1.0)
        tx.commit()
    contender.join()
    assert errors == []
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
