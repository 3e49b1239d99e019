"""A worker declared dead during a pause comes back: jobs that NAME it (tracked jobs, user rows
with an owner column) are not settled on the old verdict (DESIGN §2.1; issue 6 item 7).

W was paused past ``jobreaper_heartbeat_timeout``; a reap pinged it, got no reply and marked
its incarnation ``dead``. W wakes. Whatever W writes after that must either carry fresh proof
of life or be judged on signals measured after it:

- a tracked job's start is written in the same transaction as a heartbeat of its incarnation
  (the tracker vouches for it), so a reap that reads the row reads that heartbeat too;
- a reap whose liveness was judged before W heartbeated re-reads the owners' heartbeats with
  the rows locked and leaves the jobs of an owner that heartbeated since;
- a user row that names W and started after W's last heartbeat is failed on "owner dead" only
  once older than the heartbeat timeout (a live W heartbeats before that).

Stages run as a run does; real databases; nobody answers pings (a busy ``-P solo`` worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from jobtables import SEED_SOURCE, ago, create_seed, seed_table
from sqlalchemy import MetaData, insert, select
from sqlalchemy.engine import Engine
from support import make_app
from test_woken_worker import _paused_and_marked_dead

from celery_jobreaper import Settings
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation, Liveness
from celery_jobreaper.planner import OWNER_MAY_HAVE_WOKEN
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import tables
from celery_jobreaper.tracking import Tracker


@pytest.fixture
def silent_reaper(
    db_url: str, engine_for: Callable[[str], Engine]
) -> Iterator[Callable[..., tuple[Reaper, Engine]]]:
    made: list[Database] = []

    def make(**conf: object) -> tuple[Reaper, Engine]:
        app = make_app(db_url, **conf)
        settings = Settings.from_app(app)
        db = Database.from_settings(settings)
        made.append(db)
        reaper = Reaper(  # nobody answers: the woken worker is busy in a -P solo task
            app, settings, db, ping=lambda nodes, timeout: set(), ask=lambda n, ids, t: set()
        )
        reaper.prepare_tables()
        return reaper, engine_for(db_url)

    yield make
    for db in made:
        db.dispose()


def _tracked_status(engine: Engine, task_id: str) -> str:
    jobs = tables.jobs
    with engine.connect() as conn:
        return str(conn.execute(select(jobs.c.status).where(jobs.c.task_id == task_id)).scalar())


def _write_tracked_start(reaper: Reaper, woken: Incarnation, task_id: str) -> None:
    tracker = Tracker(reaper.db, tables, reaper.settings, woken)
    try:
        tracker.started(task_id, "proj.long", woken.node)
        assert tracker.flush(timeout=30)
    finally:
        tracker.close()


def test_a_woken_workers_new_tracked_job_is_left_alone(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    reaper, engine = silent_reaper(track_tasks=True, sources=[])
    woken = _paused_and_marked_dead(engine, reaper)
    _write_tracked_start(reaper, woken, "t-new")  # W is back: its task starts a tracked job
    report = reaper.run("manual")
    assert _tracked_status(engine, "t-new") == "running", report
    assert report.settled == 0


def test_a_woken_workers_tracked_jobs_are_left_alone_by_a_reap_that_judged_it_before(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    """The reap judged W dead (paused past the timeout, no reply), then W woke and started a
    tracked job before the reap settled: neither that job nor W's job from before the pause
    (W is back, running it) is settled on the verdict."""
    reaper, engine = silent_reaper(track_tasks=True, sources=[])
    jobs, inc, timeout = tables.jobs, tables.incarnations, reaper.settings.heartbeat_timeout
    woken = Incarnation.new("woken@h")
    with engine.begin() as conn:
        Liveness(tables, heartbeat_timeout=timeout).register(conn, woken)
        past = ago(seconds=3 * timeout)
        conn.execute(
            inc.update().where(inc.c.id == woken.id).values(started_at=past, heartbeat_at=past)
        )
        conn.execute(
            insert(jobs).values(
                task_id="t-old",
                task_name="proj.long",
                status="running",
                node=woken.node,
                incarnation_id=woken.id,
                started_at=ago(seconds=4 * timeout),
            )
        )
    view = reaper.assess()
    assert woken.id in view.dead_incarnations
    _write_tracked_start(reaper, woken, "t-new")
    report = reaper.run("manual", view=view)
    assert _tracked_status(engine, "t-new") == "running", report
    assert _tracked_status(engine, "t-old") == "running", report
    assert report.settled == 0


def test_a_tracked_job_of_an_owner_still_silent_is_settled(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    """The other side: the tracked job was written before W fell silent; W never came back."""
    reaper, engine = silent_reaper(track_tasks=True, sources=[])
    woken = _paused_and_marked_dead(engine, reaper)
    tracker = Tracker(reaper.db, tables, reaper.settings, woken)
    try:
        tracker.started("t-old", "proj.long", woken.node)
        assert tracker.flush(timeout=30)
    finally:
        tracker.close()
    # W vouched for its job when it wrote it; then it is silent past the timeout again.
    inc = tables.incarnations
    with engine.begin() as conn:
        conn.execute(
            inc.update()
            .where(inc.c.id == woken.id)
            .values(heartbeat_at=ago(seconds=3 * reaper.settings.heartbeat_timeout))
        )
    report = reaper.run("manual")
    assert _tracked_status(engine, "t-old") == "failed", report


def _owner_row(engine: Engine, node: str, *, started_seconds_ago: float) -> None:
    table = seed_table(MetaData(), owner=True)
    with engine.begin() as conn:
        conn.execute(
            insert(table).values(
                job_id="job",
                job_type="library_scan",
                status="running",
                started_at=ago(seconds=started_seconds_ago),
                owner=node,
            )
        )


def _seed_status(engine: Engine) -> tuple[str, str | None]:
    with engine.connect() as conn:
        row = conn.execute(select(seed_table(MetaData(), owner=True))).one()
    return row.status, row.error


def test_a_user_row_started_after_its_owners_last_heartbeat_waits_for_the_timeout(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    reaper, engine = silent_reaper(sources=[{**SEED_SOURCE, "owner": "owner"}])
    create_seed(engine, [], owner=True)
    woken = _paused_and_marked_dead(engine, reaper)
    _owner_row(engine, woken.node, started_seconds_ago=2)  # written by W after it woke
    report = reaper.run("manual")
    assert _seed_status(engine)[0] == "running", report
    assert report.left_alone.get(OWNER_MAY_HAVE_WOKEN) == 1, report.left_alone


def test_a_user_row_of_a_silent_owner_older_than_the_timeout_is_settled(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    """The bound: started after W's last heartbeat, but W has been silent (no heartbeat, no
    reply) for longer than the timeout since the row started: W is dead."""
    reaper, engine = silent_reaper(sources=[{**SEED_SOURCE, "owner": "owner"}])
    create_seed(engine, [], owner=True)
    woken = _paused_and_marked_dead(engine, reaper)
    timeout = reaper.settings.heartbeat_timeout
    _owner_row(engine, woken.node, started_seconds_ago=timeout + 5)
    report = reaper.run("manual")
    status, error = _seed_status(engine)
    assert status == "failed", report
    assert woken.node in (error or "")


def test_a_user_row_whose_owner_heartbeated_after_the_verdict_is_left_alone(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    """An old row of W (started before its last heartbeat): the run judged W dead, then W
    heartbeated (back from the pause) before the run settled: the verdict no longer holds."""
    reaper, engine = silent_reaper(sources=[{**SEED_SOURCE, "owner": "owner"}])
    create_seed(engine, [], owner=True)
    woken = _paused_and_marked_dead(engine, reaper)
    _owner_row(engine, woken.node, started_seconds_ago=10 * reaper.settings.heartbeat_timeout)
    view = reaper.assess()
    assert woken.node in view.dead_nodes
    with engine.begin() as conn:
        Liveness(tables, heartbeat_timeout=reaper.settings.heartbeat_timeout).heartbeat(conn, woken)
    report = reaper.run("manual", view=view)
    assert _seed_status(engine)[0] == "running", report
    assert report.settled == 0


def test_a_fresh_workers_tracked_start_writes_no_heartbeat(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    """The vouch renews only a heartbeat a reaper could judge the worker dead on: a worker that
    heartbeated just now writes its running job without touching its incarnation row (no write,
    no row lock in the tracker's transaction)."""
    reaper, engine = silent_reaper(track_tasks=True, sources=[])
    me = Incarnation.new("fresh@h")
    inc = tables.incarnations
    with engine.begin() as conn:
        Liveness(tables, heartbeat_timeout=reaper.settings.heartbeat_timeout).register(conn, me)
    with engine.connect() as conn:
        before = conn.execute(select(inc.c.heartbeat_at).where(inc.c.id == me.id)).scalar_one()
    _write_tracked_start(reaper, me, "t-fresh")
    with engine.connect() as conn:
        after = conn.execute(select(inc.c.heartbeat_at).where(inc.c.id == me.id)).scalar_one()
    assert after == before
    assert _tracked_status(engine, "t-fresh") == "running"
