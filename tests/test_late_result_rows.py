"""A result row's FAILURE written over jobreaper's FAILURE (DESIGN §2.4): what is a late write
and what is not. Found by the adversarial review of that check; each test failed on the code it
was written against."""

from __future__ import annotations

import traceback as tb
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.result import AsyncResult
from jobtables import ago
from sqlalchemy.engine import Engine
from test_result_rows import apps, events, reap, register, started

from celery_jobreaper.schema import create_all, tables

__all__ = ["apps"]


def _late(engine: Engine) -> list[Any]:
    return [e for e in events(engine) if e.action == "late_write"]


@pytest.mark.parametrize("how", ["chained", "reraised"])
def test_a_late_failure_over_a_settled_subtasks_error_is_recorded(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery], how: str
) -> None:
    """Worker A (paused, found dead) ran T, which waits on S's result (S ran on B, which
    really died). jobreaper settles both. A wakes: S.get() raises the WorkerLostError
    jobreaper stored for S; T fails with its own error chained to it, or lets it propagate
    (the default), and Celery's backend stores T's FAILURE with its traceback over
    jobreaper's FAILURE. T's traceback quotes jobreaper's text ("(found by jobreaper at "),
    yet it is T's own failure (a whole traceback): recorded."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "a@h", ago(minutes=10))
    register(engine, "b@h", ago(minutes=10))
    started(app, "t-T", "a@h")
    started(app, "t-S", "b@h")
    assert reap(app).settled == 2
    # A wakes; T's code: S.get() (allow_join_result / disable_sync_subtasks=False)
    try:
        try:
            AsyncResult("t-S", app=app).get(disable_sync_subtasks=False, timeout=1)
        except Exception as sub:
            if how == "reraised":
                raise
            raise RuntimeError("report build failed: a subtask failed") from sub
    except Exception as exc:
        text = tb.format_exc()  # what Celery stores (ExceptionInfo.traceback)
        app.backend.store_result("t-T", exc, states.FAILURE, traceback=text)
    stored = AsyncResult("t-T", app=app)
    assert stored.state == states.FAILURE
    assert (stored.traceback or "").startswith("Traceback (most recent")
    assert "(found by jobreaper at " in (stored.traceback or "")  # it quotes jobreaper's text
    reap(app)
    assert [e.job_id for e in _late(engine)] == ["t-T"], "T's late FAILURE went unrecorded"


def _own_reap(app: Celery, me: Any) -> Any:
    """A periodic reap in worker *me*'s own process: it holds no task (the pool process
    that ran t-oom died; Celery's on_failure already called task_ready)."""
    from sqlalchemy import MetaData, Table, inspect, select

    from celery_jobreaper import Settings
    from celery_jobreaper.database import Database
    from celery_jobreaper.reaper import Reaper
    from celery_jobreaper.sightings import Sightings

    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    sightings = Sightings()
    if inspect(db.engine).has_table("celery_taskmeta"):
        table = Table("celery_taskmeta", MetaData(), autoload_with=db.engine)
        with db.engine.connect() as conn:
            ids = conn.execute(select(table.c.task_id).where(table.c.status == "STARTED"))
            sightings.note("celery_taskmeta", list(ids.scalars()), ago(hours=1))
    reaper = Reaper(
        app,
        settings,
        db,
        me=me,
        held=set,
        ping=lambda nodes, timeout: set(),
        ask=lambda nodes, ids, timeout: set(),
        sightings=sightings,
    )
    try:
        return reaper.run("periodic")
    finally:
        db.dispose()


def test_celerys_own_report_of_a_lost_pool_process_after_the_settle_is_not_a_late_write(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """Worker me@h is alive; a pool process running
    t-oom is OOM-killed. Celery's Request.on_failure calls task_ready(self) (the task leaves
    the worker's held set) and then backend.mark_as_failure(WorkerLostError). A periodic reap
    of the same worker that runs between the two settles the row (POOL_PROCESS_LOST, DESIGN §4)
    and Celery's FAILURE then lands over it. Nothing late happened (the owner is alive; it is
    Celery's normal bookkeeping of the same loss), yet the next reap records a late_write
    ("the worker found dead finished the task after all"): it must not."""
    from billiard.exceptions import WorkerLostError

    from celery_jobreaper.incarnation import Incarnation
    from celery_jobreaper.liveness import Liveness

    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    me = Incarnation.new("me@h")
    with engine.begin() as conn:
        Liveness(tables, heartbeat_timeout=60).register(conn, me)
    started(app, "t-oom", "me@h")
    first = _own_reap(app, me)
    assert first.settled == 1, first
    assert "no longer held" in (AsyncResult("t-oom", app=app).traceback or "")
    # ... and now Celery's on_failure goes on: mark_as_failure (Request.on_failure)
    # Celery's on_failure stores its report without a traceback (mark_as_failure's default)
    app.backend.mark_as_failure(
        "t-oom",
        WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 0."),
        request=Context(hostname="me@h"),
    )
    _own_reap(app, me)
    late = _late(engine)
    assert late == [], [(e.job_id, e.previous_status, e.new_status, e.reason) for e in late]


def test_a_new_run_of_a_reused_task_id_that_fails_is_not_a_late_write(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """jobreaper supports apps that reuse deterministic task ids
    (it un-revokes a settled id once its message is gone, test_forget_settled). The app
    re-sends the settled task id; a live worker runs it (STARTED naming live@h: not a late
    write, test_a_new_run_of_a_settled_task_id_on_a_live_worker_is_not_a_late_result) and it
    fails on its own. Without result_extended, the STARTED naming live@h seen by a reap says
    the settlement is done with: the new run's outcome is not a late write of dead@h."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))
    register(engine, "live@h", ago(seconds=1))
    started(app, "nightly-2026-12-02", "dead@h")
    assert reap(app).settled == 1
    started(app, "nightly-2026-12-02", "live@h")  # the new run
    reap(app)
    assert _late(engine) == []
    app.backend.store_result(
        "nightly-2026-12-02",
        ValueError("upstream down"),
        states.FAILURE,
        traceback="Traceback (most recent call last):\nValueError: upstream down",
    )
    reap(app)
    late = _late(engine)
    assert late == [], [(e.job_id, e.owner, e.new_status) for e in late]


def test_a_woken_owners_hard_time_limit_report_over_the_failure_is_recorded(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """dead@h is paused (docker pause / SIGSTOP) longer than the heartbeat timeout; a
    reap settles its STARTED row (owner_dead). On SIGCONT, billiard's timeout handler in
    dead@h's main process sees the task's hard time limit passed during the pause, kills
    the child, and Request.on_timeout stores TimeLimitExceeded (traceback None) over
    jobreaper's FAILURE. That is the old owner's write after the settlement -- the proof
    that the 'dead' worker was alive: recorded (DESIGN §2.4). (Only over a settlement of a
    live worker's lost pool process is such a report the same loss.)"""
    from billiard.exceptions import TimeLimitExceeded

    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))
    started(app, "t-slow", "dead@h")
    assert reap(app).settled == 1
    # dead@h wakes: celery.worker.request.Request.on_timeout (hard)
    app.backend.mark_as_failure(
        "t-slow", TimeLimitExceeded(300.0), request=Context(hostname="dead@h")
    )
    assert AsyncResult("t-slow", app=app).traceback is None
    reap(app)
    assert [e.job_id for e in _late(engine)] == ["t-slow"], "woken owner's write not recorded"


def test_a_tasks_own_time_limit_error_with_a_whole_traceback_is_recorded(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """T ran on a.h (paused, settled). S ran on live b@h and hit its hard time limit
    (Celery stored TimeLimitExceeded for S). a@h wakes; T's S.get() re-raises S's
    TimeLimitExceeded; Celery's trace stores T's own FAILURE with a whole traceback
    ('Traceback (most recent call last): ...'). Celery's own loss reports never carry a
    traceback (mark_as_failure(..., traceback=None)): T's late FAILURE is recorded."""
    from billiard.exceptions import TimeLimitExceeded

    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "a@h", ago(minutes=10))
    started(app, "t-T", "a@h")
    assert reap(app).settled == 1
    app.backend.mark_as_failure("t-S", TimeLimitExceeded(60.0), request=Context(hostname="b@h"))
    try:
        AsyncResult("t-S", app=app).get(disable_sync_subtasks=False, timeout=1)
    except Exception as exc:
        assert type(exc).__name__ == "TimeLimitExceeded"
        app.backend.store_result("t-T", exc, states.FAILURE, traceback=tb.format_exc())
    assert (AsyncResult("t-T", app=app).traceback or "").startswith("Traceback (most recent")
    reap(app)
    assert [e.job_id for e in _late(engine)] == ["t-T"], "T's own late FAILURE not recorded"


def test_a_woken_workers_retry_is_recorded_before_its_rerun_elsewhere(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery]
) -> None:
    """No result_extended: dead@h wakes, its task calls self.retry(): RETRY stored over
    jobreaper's FAILURE. The retry message (same task id) runs on live@h: STARTED naming
    live@h, then SUCCESS. The RETRY, seen by a reap, is the late write: recorded (before, a
    RETRY was taken for a run under way, and the STARTED of live@h then for a new run of a
    reused id, so nothing was ever recorded). A retry that runs before any reap saw its RETRY
    is a new run to the check (README: known limit)."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url)
    register(engine, "dead@h", ago(minutes=10))
    register(engine, "live@h", ago(seconds=1))
    started(app, "t-r", "dead@h")
    assert reap(app).settled == 1
    app.backend.mark_as_retry("t-r", ValueError("upstream 503"), traceback="Traceback ...")
    reap(app)
    started(app, "t-r", "live@h")  # the retry of the woken worker's run
    reap(app, held_by_peers={"t-r"})
    app.backend.mark_as_done("t-r", {"rows": 10})
    reap(app)
    assert [e.job_id for e in _late(engine)] == ["t-r"], "the settled task's late run unrecorded"


def _context(node: str) -> Context:
    """The request a worker's backend call carries (``result_extended`` stores its fields)."""
    return Context(
        hostname=node,
        task="proj.nightly",
        args=(),
        kwargs={},
        retries=0,
        delivery_info={"routing_key": "celery"},
    )


@pytest.mark.parametrize("extended", [False, True], ids=["plain", "result_extended"])
def test_a_new_run_on_a_worker_restarted_under_the_same_name_is_not_a_late_write(
    db_url: str, engine_for: Callable[[str], Engine], apps: Callable[..., Celery], extended: bool
) -> None:
    """One worker whose node name is stable across restarts (a VM, a StatefulSet); the app
    reuses task ids. The old incarnation died and its STARTED row was settled. The restarted
    w@h runs the re-sent id: STARTED naming w@h, then SUCCESS. The settled run wrote STARTED
    once, before it was settled: a STARTED seen over jobreaper's FAILURE is a new run whatever
    node it names, so its SUCCESS is not "the worker found dead finished the task after
    all" (before: recorded, and with result_extended at once on the STARTED)."""
    engine = engine_for(db_url)
    create_all(engine)
    app = apps(db_url, result_extended=extended)
    register(engine, "w@h", ago(minutes=10))
    store = app.backend.store_result
    store("nightly-1", {"pid": 1, "hostname": "w@h"}, states.STARTED, request=_context("w@h"))
    assert reap(app).settled == 1
    with engine.begin() as conn:  # the restarted worker: a new incarnation of w@h
        conn.execute(
            tables.incarnations.insert().values(
                id="n" * 32,
                node="w@h",
                host="h",
                pid=2,
                started_at=ago(seconds=30),
                heartbeat_at=ago(seconds=1),
                state="running",
            )
        )
    store("nightly-1", {"pid": 2, "hostname": "w@h"}, states.STARTED, request=_context("w@h"))
    reap(app, held_by_peers={"nightly-1"})
    store("nightly-1", {"ok": True}, states.SUCCESS, request=_context("w@h"))
    reap(app)
    late = _late(engine)
    assert late == [], [(e.job_id, e.owner, e.new_status, e.reason) for e in late]
