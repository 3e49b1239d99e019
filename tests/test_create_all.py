"""``create_all`` at a worker's start: the version is read on the connection that listed the
tables when every table exists (no second connection), and recorded (committed) when missing;
several workers creating the tables at once all go on."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import delete, event, select
from support import make_app

from celery_jobreaper.database import Database
from celery_jobreaper.schema import SCHEMA_VERSION, create_all, tables
from celery_jobreaper.settings import Settings


def _db(url: str) -> Database:
    return Database.from_settings(Settings.from_app(make_app(url)))


def _stored(db: Database) -> list[str]:
    with db.connect() as conn:
        return [str(v) for v in conn.execute(select(tables.meta.c.value)).scalars()]


def test_existing_tables_one_connection_and_version_recorded_when_missing(db_url: str) -> None:
    db = _db(db_url)
    try:
        assert create_all(db.engine) == str(SCHEMA_VERSION)  # creates everything
        checkouts: list[Any] = []
        event.listen(db.engine.pool, "checkout", lambda *a: checkouts.append(a))
        assert create_all(db.engine) == str(SCHEMA_VERSION)  # read back
        assert len(checkouts) == 1
        # tables made elsewhere (Alembic) without the version row: recorded, and committed
        with db.connect() as conn, conn.begin():
            conn.execute(delete(tables.meta))
        assert _stored(db) == []
        assert create_all(db.engine) == str(SCHEMA_VERSION)
        assert _stored(db) == [str(SCHEMA_VERSION)]
    finally:
        db.dispose()


def test_workers_creating_the_tables_at_once_all_go_on(db_url: str) -> None:
    dbs = [_db(db_url) for _ in range(4)]
    barrier = threading.Barrier(len(dbs))
    results: list[str | None] = []
    errors: list[BaseException] = []

    def start(db: Database) -> None:
        barrier.wait()
        try:
            results.append(create_all(db.engine))
        except BaseException as error:  # (reported below)
            errors.append(error)

    threads = [threading.Thread(target=start, args=(db,)) for db in dbs]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        assert len(results) == len(dbs)
        assert set(results) <= {str(SCHEMA_VERSION), None}
        assert _stored(dbs[0]) == [str(SCHEMA_VERSION)]
    finally:
        for db in dbs:
            db.dispose()
