"""A stale row whose owner is NULL, in a table with an owner column, is judged by the rule
for jobs without owner: "no other live worker" needs a ping of every worker to confirm it
(a worker marked dead that is back, or one without jobreaper, answers it), as for a table
without an owner column (DESIGN §2.1)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import pytest
from jobtables import SEED_SOURCE, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import make_app

from celery_jobreaper import Settings
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation, Liveness
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import tables


@pytest.mark.parametrize("owner_column", [False, True], ids=["no-owner-column", "null-owner"])
def test_a_worker_answering_a_ping_of_everyone_keeps_the_ownerless_row(
    owner_column: bool, db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(db_url)
    table = create_seed(engine, [{"job_id": "j1"}], owner=owner_column)  # owner NULL
    source = {**SEED_SOURCE, **({"owner": "owner"} if owner_column else {})}
    app = make_app(db_url, sources=[source])
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    me = Incarnation.new("me@h")
    pinged: list[Collection[str] | None] = []

    def ping(nodes: Collection[str] | None, timeout: float) -> set[str]:
        pinged.append(nodes)
        return {"other@h"} if nodes is None else set()  # only a ping of everyone hears it

    reaper = Reaper(app, settings, db, me=me, ping=ping, ask=lambda n, i, t: set(), held=set)
    try:
        reaper.prepare_tables()
        with engine.begin() as conn:
            Liveness(tables, heartbeat_timeout=60).register(conn, me)
        report = reaper.run("periodic")
    finally:
        db.dispose()
    with engine.connect() as conn:
        assert conn.execute(select(table.c.status)).scalar_one() == "running"
    assert None in pinged and report.settled == 0
