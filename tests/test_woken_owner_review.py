"""Adversarial review of the woken-owner and result-row late-write work (DESIGN §2.1, §2.4,
§2.7, and the liveness bound): a woken owner's new row whose start is unknown or ahead of the
database's clock; a writer stalled while it holds an incarnation row (a paused heartbeat
transaction, a pool process stalled mid-flush) never holds a reap, a start or the lease; the
checks made again with a batch's rows locked see what was committed meanwhile (MariaDB too);
late writes to result rows are told from the settle's own revoke and from a new run. Each test
failed on the code it was written against (main at b76ba37), except the controls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, states
from celery.result import AsyncResult
from jobtables import SEED_SOURCE, ago, create_seed, seed_table
from sqlalchemy import MetaData, insert, select
from sqlalchemy.engine import Engine
from support import make_app
from test_result_rows import SOURCE, apps, events, reap, register, started  # noqa: F401
from test_woken_owner import silent_reaper
from test_woken_worker import _paused_and_marked_dead

from celery_jobreaper import Settings, python_stage
from celery_jobreaper.apply import settle_batch as apply_settle_batch
from celery_jobreaper.clock import utcnow
from celery_jobreaper.database import Database
from celery_jobreaper.incarnation import Incarnation
from celery_jobreaper.liveness import Liveness
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.schema import create_all, tables
from celery_jobreaper.tracking import Tracker
from celery_jobreaper.tracking.statements import Statements

__all__ = ["apps", "silent_reaper"]


def _owner_row(engine: Engine, node: str, started_at: Any) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(seed_table(MetaData(), owner=True)).values(
                job_id="job",
                job_type="library_scan",
                status="running",
                started_at=started_at,
                owner=node,
            )
        )


def _seed_status(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(seed_table(MetaData(), owner=True).c.status)).scalar_one())


# --- Finding 1: an owner-column row whose start is unknown gets no "may have woken" wait ---


def test_woken_owners_new_user_row_without_start_is_left_alone(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    """§2.1 / issue 6 item 7: W was marked dead during a pause, wakes, and its task writes a
    row naming W (``started_at`` NULL: the application does not stamp it) before W's first
    heartbeat. A reap now must not fail it on the verdict measured before the row existed."""
    reaper, engine = silent_reaper(sources=[{**SEED_SOURCE, "owner": "owner"}])
    create_seed(engine, [], owner=True)
    woken = _paused_and_marked_dead(engine, reaper)
    _owner_row(engine, woken.node, None)  # written by W just after it woke
    report = reaper.run("manual")
    assert _seed_status(engine) == "running", report


def test_woken_owners_new_result_row_is_left_alone(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """The same through Celery's own database backend (``celery_taskmeta`` stores no start):
    W, marked dead during a pause, wakes and starts a task (its backend writes STARTED) before
    its first heartbeat; the reap fails a task that W is running."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "woken@h", ago(minutes=10))
    reap(app)  # the earlier verdict: stale heartbeat, no reply (marked dead)
    started(app, "t-new", "woken@h")  # W is back and running t-new
    report = reap(app, watched=False)
    assert AsyncResult("t-new", app=app).state == states.STARTED, report


# --- Finding 2: a started_at ahead of the database clock defers a dead owner's job ---


def test_dead_owners_row_stamped_ahead_of_the_db_clock_is_settled_within_the_bound(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
) -> None:
    """The liveness bound: W died long ago (silent for 3 timeouts); its row's naive
    ``started_at`` is local time two hours ahead of UTC (``timezone`` left at the default, or
    a writer clock ahead). Such a start says nothing: the row is aged by when the reaper first
    saw it, so it is settled once seen for the heartbeat timeout, not two hours later."""
    import time
    from datetime import timedelta

    from celery_jobreaper.planner import OWNER_MAY_HAVE_WOKEN

    reaper, engine = silent_reaper(
        sources=[{**SEED_SOURCE, "owner": "owner"}], heartbeat_interval=0.3, heartbeat_timeout=1
    )
    create_seed(engine, [], owner=True)
    woken = _paused_and_marked_dead(engine, reaper)  # W's heartbeat: 3 timeouts ago
    _owner_row(engine, woken.node, utcnow() + timedelta(hours=2))
    first = reaper.run("manual")
    assert _seed_status(engine) == "running", first  # first sight: W may be back
    assert first.left_alone.get(OWNER_MAY_HAVE_WOKEN) == 1, first.left_alone
    time.sleep(1.2)
    report = reaper.run("manual")
    assert _seed_status(engine) == "failed", report


# --- Finding 3: MariaDB's REPEATABLE READ snapshot: the "rows locked" re-read sees nothing new ---


def test_owner_heartbeat_while_the_batch_is_locked_is_seen(
    db_url: str,
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """recheck.owners_back is called again after settle_batch "with rows locked". W heartbeats
    (back from the pause) between the first re-read and the lock: the second re-read must see
    it. PostgreSQL (READ COMMITTED) does; MariaDB (REPEATABLE READ) reads the transaction's
    snapshot, taken at the first re-read, and settles the job."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite: BEGIN IMMEDIATE excludes the heartbeat's writer")
    reaper, engine = silent_reaper(sources=[{**SEED_SOURCE, "owner": "owner"}])
    create_seed(engine, [], owner=True)
    woken = _paused_and_marked_dead(engine, reaper)
    _owner_row(engine, woken.node, ago(seconds=10 * reaper.settings.heartbeat_timeout))
    view = reaper.assess()
    assert woken.node in view.dead_nodes
    real = apply_settle_batch

    def heartbeat_then_settle(*args: Any, **kw: Any) -> Any:
        with engine.begin() as conn:  # W's heartbeat thread, another connection
            Liveness(tables, heartbeat_timeout=reaper.settings.heartbeat_timeout).heartbeat(
                conn, woken
            )
        return real(*args, **kw)

    monkeypatch.setattr(python_stage, "settle_batch", heartbeat_then_settle)
    report = reaper.run("manual", view=view)
    assert _seed_status(engine) == "running", report


# --- Finding 4: a tracker transaction stalled after its vouch blocks reapers (mark_dead) ---


def test_a_stalled_tracker_transaction_does_not_block_a_reap(
    db_url: str, silent_reaper: Callable[..., tuple[Reaper, Engine]]
) -> None:
    """W's tracker vouched (UPDATE of W's incarnation row) and then stalled before COMMIT: W
    paused (SIGSTOP) or partitioned from the database mid-flush. W's heartbeat is stale, W
    answers no ping: any reap judges it dead and ``mark_dead`` UPDATEs that row -- and waits
    for W's lock (PostgreSQL: for ever; MariaDB: innodb_lock_wait_timeout). Periodic reaps
    hold the lease row FOR UPDATE in that transaction, so no one else can take over."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite: one writer at a time by design")
    reaper, engine = silent_reaper(track_tasks=True, sources=[])
    stalled, tx = _stalled_vouch(engine, reaper.settings.heartbeat_timeout)
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reaper.run("manual")
        except BaseException as error:
            errors.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        finished = done.wait(10)
    finally:
        tx.rollback()
        stalled.close()
        thread.join(60)
    assert finished, "the reap waited >10 s for the stalled tracker's lock on the incarnation row"
    assert not errors


# --- Finding 5: a revoked redelivery of a settled task is reported as a late result ---


def test_revoked_redelivery_of_a_settled_result_row_is_not_a_late_result(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """jobreaper revokes a settled job's task id in live workers (workerstate.remember_settled)
    so its message is discarded. A live worker that receives the redelivered message then does
    what Celery does for a revoked id: ``backend.mark_as_revoked`` (Request._announce_revoked),
    storing REVOKED over jobreaper's FAILURE. That is jobreaper's own fence at work, not "the
    worker found dead finished the task after all": no late_write should be recorded."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))
    started(app, "t-1", "dead@h")
    assert reap(app).settled == 1
    assert AsyncResult("t-1", app=app).state == states.FAILURE
    app.backend.mark_as_revoked("t-1", "revoked")  # a live worker discards the redelivery
    reap(app)
    late = [e for e in events(engine) if e.action == "late_write"]
    assert late == [], [(e.job_id, e.new_status, e.reason) for e in late]


def _stalled_vouch(engine: Engine, timeout: float) -> tuple[Any, Any]:
    """W registered, silent past *timeout*, and its tracker stopped after the vouch UPDATE (a
    pause or a partition mid-flush): returns the open connection and transaction."""
    w = Incarnation.new("stalled@h")
    inc = tables.incarnations
    with engine.begin() as conn:
        Liveness(tables, heartbeat_timeout=timeout).register(conn, w)
        past = ago(seconds=3 * timeout)
        conn.execute(
            inc.update().where(inc.c.id == w.id).values(started_at=past, heartbeat_at=past)
        )
    stalled = engine.connect()
    tx = stalled.begin()
    with stalled.begin_nested():  # a heartbeat paused mid-transaction holds the row the same
        Liveness(tables, heartbeat_timeout=timeout).heartbeat(stalled, w)
    return stalled, tx


def test_a_stalled_tracker_transaction_does_not_hold_up_another_workers_start(
    db_url: str, engine_for: Callable[[str], Engine], unique: str
) -> None:
    """DESIGN §2.7: worker A starts while W's tracker transaction is stalled after its vouch.
    A's startup reap (synchronous in the worker's start step, no timeout) judges W dead and
    its mark_dead waits for W's row lock: A does not start (PostgreSQL: as long as W's
    backend keeps the lock; MariaDB: innodb_lock_wait_timeout, 50 s by default)."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite: one writer at a time by design")
    from test_lease import _worker

    app = make_app(db_url, track_tasks=True, sources=[], heartbeat_timeout=30)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    engine = engine_for(db_url)
    create_all(engine)
    stalled, tx = _stalled_vouch(engine, settings.heartbeat_timeout)
    a = _worker(app, db, f"a-{unique}@h", settings)
    done = threading.Event()

    def start() -> None:
        try:
            a.startup()
        finally:
            done.set()

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    try:
        started_in_time = done.wait(15)
    finally:
        tx.rollback()
        stalled.close()
        thread.join(60)
        db.dispose()
    assert started_in_time, "worker A's start waited >15 s for a stalled tracker's row lock"


@pytest.mark.parametrize("traceback", [None, "Traceback (most recent call last):\nValueError"])
def test_a_lost_workers_late_failure_over_jobreapers_failure_is_recorded(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery], traceback: str
) -> None:
    """DESIGN §2.4 ("cannot silently overwrite it; the late result is recorded"): the worker
    found dead was only paused; its task then raised, and Celery's backend stores its FAILURE
    (its own exception, with or without a traceback) over jobreaper's FAILURE. The status is
    the same: the traceback tells them apart. Before, only the status was compared and the
    overwrite went unrecorded. Reaps before the late write record nothing (jobreaper's own
    FAILURE is not a late write)."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))
    started(app, "t-late", "dead@h")
    assert reap(app).settled == 1
    reap(app)
    assert [e for e in events(engine) if e.action == "late_write"] == []
    app.backend.store_result(
        "t-late", ValueError("the task's own error"), states.FAILURE, traceback=traceback
    )
    reap(app)
    reap(app)
    late = [e for e in events(engine) if e.action == "late_write"]
    assert [(e.job_id, e.previous_status, e.new_status) for e in late] == [
        ("t-late", states.FAILURE, states.FAILURE)
    ]


def test_a_pool_process_stalled_after_its_vouch_does_not_stop_the_workers_heartbeat(
    db_url: str, engine_for: Callable[[str], Engine], unique: str
) -> None:
    """Every pool process's tracker now UPDATEs the worker's one incarnation row (the vouch),
    in a transaction that also writes the jobs. A pool process stalled in it (its writer
    thread starved of the GIL by a task in a C call, a SIGSTOPped child, a partition) makes
    the main process's heartbeat wait for that row: the heartbeat goes stale and the lease is
    not renewed (both in the heartbeat thread). Before the change only the heartbeat wrote it."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite: one writer at a time by design")
    from test_lease import _worker

    app = make_app(db_url, track_tasks=True, sources=[], heartbeat_timeout=30)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    engine = engine_for(db_url)
    a = _worker(app, db, f"a-{unique}@h", settings)
    a.startup()
    stalled = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    if engine.dialect.name in ("mysql", "mariadb"):
        stalled.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    stalled.exec_driver_sql("BEGIN")  # a child's flush, as the tracker writes it, stalled
    statements = Statements(tables.jobs, tables.incarnations)
    statements.vouch(stalled, a.me.id, older_than=1.5 * settings.heartbeat_interval)
    statements.upsert(
        stalled,
        [
            {
                "task_id": "t-stalled",
                "task_name": "proj.long",
                "status": "running",
                "incarnation_id": a.me.id,
                "node": a.me.node,
                "started_at": utcnow(),
                "completed_at": None,
                "error": None,
                "fence": "f",
                "times_reaped": 0,
            }
        ],
    )
    tx = _Rollback(stalled)
    done = threading.Event()

    def beat() -> None:
        try:
            a.beat()
        finally:
            done.set()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        beat_in_time = done.wait(10)
    finally:
        tx.rollback()
        stalled.close()
        thread.join(60)
        db.dispose()
    assert beat_in_time, "the worker's heartbeat waited >10 s behind its pool process's vouch"


def test_a_woken_worker_still_says_it_was_declared_dead_when_its_tracker_vouched_first(
    db_url: str, engine_for: Callable[[str], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    """Liveness.heartbeat warns once when this worker finds itself marked ``dead`` ("its jobs
    of that time were settled"). A tracker vouch that lands first flips ``dead`` back to
    ``running`` silently, so the operator never hears of it."""
    engine = engine_for(db_url)
    create_all(engine)
    w = Incarnation.new("woken@h")
    inc = tables.incarnations
    liveness = Liveness(tables, heartbeat_timeout=30)
    with engine.begin() as conn:
        liveness.register(conn, w)
        conn.execute(inc.update().where(inc.c.id == w.id).values(state="dead"))
    app = make_app(str(engine.url.render_as_string(hide_password=False)), track_tasks=True)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    tracker = Tracker(db, tables, settings, w)
    try:
        with caplog.at_level("WARNING", logger="celery_jobreaper"):
            # W wakes: a task starts (tracked) before the heartbeat; its flush vouches first
            tracker.started("t-new", "proj.long", w.node)
            assert tracker.flush(timeout=30)
            with engine.begin() as conn:
                liveness.heartbeat(conn, w)
    finally:
        tracker.close()
        db.dispose()
    assert caplog.text.count("declared dead") == 1, caplog.text


class _Rollback:
    """Ends the stalled flush (its explicit BEGIN on an autocommit connection)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def rollback(self) -> None:
        self.conn.exec_driver_sql("ROLLBACK")


def test_a_new_run_of_a_settled_task_id_on_a_live_worker_is_not_a_late_result(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """A settled job's task id runs again on a live worker (the application re-sends it with
    the same id -- deterministic ids, an admin "retry" -- once its revoked entry is gone):
    Celery's backend writes STARTED naming that live worker. That is a new run, not "the
    worker found dead finished the task after all"; the row's own hostname says so."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))
    register(engine, "live@h", utcnow())
    started(app, "t-1", "dead@h")
    assert reap(app).settled == 1
    started(app, "t-1", "live@h")  # the new run, on a live worker
    reap(app)
    late = [e for e in events(engine) if e.action == "late_write"]
    assert late == [], [(e.job_id, e.new_status, e.owner, e.reason) for e in late]


def test_control_the_locked_reread_works_on_mariadb_under_read_committed(
    silent_reaper: Callable[..., tuple[Reaper, Engine]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control for test_owner_heartbeat_while_the_batch_is_locked_is_seen[mariadb] (passes):
    the same run with the reaper's connections at READ COMMITTED sees the heartbeat, so the
    failure there is the REPEATABLE READ snapshot, nothing else."""
    reaper, engine = silent_reaper(sources=[{**SEED_SOURCE, "owner": "owner"}])
    if engine.dialect.name not in ("mysql", "mariadb"):
        pytest.skip("the control is for MariaDB")
    create_seed(engine, [], owner=True)
    woken = _paused_and_marked_dead(engine, reaper)
    _owner_row(engine, woken.node, ago(seconds=10 * reaper.settings.heartbeat_timeout))
    view = reaper.assess()
    rc = reaper.db._engine.execution_options(isolation_level="READ COMMITTED")
    monkeypatch.setattr(reaper.db, "_engine", rc)
    real = apply_settle_batch

    def heartbeat_then_settle(*args: Any, **kw: Any) -> Any:
        with engine.begin() as conn:
            Liveness(tables, heartbeat_timeout=reaper.settings.heartbeat_timeout).heartbeat(
                conn, woken
            )
        return real(*args, **kw)

    monkeypatch.setattr(python_stage, "settle_batch", heartbeat_then_settle)
    report = reaper.run("manual", view=view)
    assert _seed_status(engine) == "running", report


def _maintenance_taken_over(
    db_url: str, engine_for: Callable[[str], Engine], unique: str, *, stall: bool
) -> bool:
    """Whether B takes the lease over from A while A's periodic reap runs (W stalled or not)."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite: one writer at a time by design")
    from support import wait_until
    from test_lease import _expired, _worker

    app = make_app(
        db_url,
        track_tasks=True,
        sources=[],
        heartbeat_interval=0.5,
        heartbeat_timeout=30,
        lease_timeout=3,
        ping_timeout=0.2,
    )
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    engine = engine_for(db_url)
    a = _worker(app, db, f"a-{unique}@h", settings)
    b = _worker(app, db, f"b-{unique}@h", settings)
    a.startup()
    b.startup()
    a.beat()
    b.beat()
    assert a.lease is not None and b.lease is not None and a.lease.leads
    stalled, tx = _stalled_vouch(engine, settings.heartbeat_timeout)
    if not stall:  # W's flush commits: its vouch is an ordinary heartbeat
        tx.commit()
    thread = threading.Thread(target=a.periodic, daemon=True)
    thread.start()
    try:
        wait_until(lambda: _expired(db), 30, "A's lease to expire")
        for _ in range(10):  # five seconds of B's heartbeats
            b.beat()
            if b.lease.leads:
                break
            thread.join(0.5)
        b_took_over = b.lease.leads
    finally:
        if stall:
            tx.rollback()
        stalled.close()
        thread.join(60)
        db.dispose()
    return b_took_over


def test_a_stalled_tracker_transaction_does_not_halt_the_clusters_maintenance(
    db_url: str, engine_for: Callable[[str], Engine], unique: str
) -> None:
    """The leader A's periodic reap judges W dead and runs mark_dead in a fenced transaction:
    the lease row is locked FOR UPDATE, then W's incarnation row waits for W's stalled vouch.
    A's lease expires, but B cannot take it over (takeovers never wait for a locked lease row):
    no worker of the cluster reaps while W stays stalled."""
    assert _maintenance_taken_over(db_url, engine_for, unique, stall=True), (
        "A's periodic reap holds the lease row while it waits for W's lock"
    )


def test_control_without_a_stalled_vouch_the_lease_is_taken_over(
    db_url: str, engine_for: Callable[[str], Engine], unique: str
) -> None:
    """Control (passes): the same with W's vouch committed: A's reap ends, B takes over."""
    assert _maintenance_taken_over(db_url, engine_for, unique, stall=False)
