"""Liveness with real workers: duplicate node names are refused; warm shutdown drains then stops."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import REDIS_URL, WorkerProcess, wait_until, worker_env

from celery_jobreaper.schema import tables


def _sender() -> Celery:
    return Celery("sender", broker=REDIS_URL, set_as_current=False)


def test_duplicate_live_node_name_is_refused(
    pg_url: str,
    engine_for: Callable[[str], Engine],
    unique: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    queue, node = f"q-{unique}", f"dup-{unique}@h"
    first = start_worker(node, env=worker_env(pg_url, queue))
    first.wait_for(r" ready\.")
    sender = _sender()
    result = sender.send_task("jr.sleep", args=(60,), kwargs={"tag": "long"}, queue=queue)
    wait_until((tmp_path / "started-long").exists, what="the long task to start")

    second = start_worker(node, env=worker_env(pg_url, f"other-{unique}"))
    log = second.wait_for(r" ready\.")
    assert f"jobreaper: refusing to settle jobs of {node}" in log
    assert "node names must be unique" in log
    second.wait_for(r"jobreaper: another live worker uses this node name")
    with engine.connect() as conn:
        job = conn.execute(select(tables.jobs).where(tables.jobs.c.task_id == result.id)).one()
        events = conn.execute(select(tables.events)).all()
    assert job.status == "running" and events == []
    sender.close()


def test_warm_shutdown_marks_draining_then_stopped_and_task_completes(
    pg_url: str,
    engine_for: Callable[[str], Engine],
    unique: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    engine = engine_for(pg_url)
    queue = f"q-{unique}"
    worker = start_worker(f"warm-{unique}@h", env=worker_env(pg_url, queue))
    worker.wait_for(r" ready\.")
    sender = _sender()
    result = sender.send_task("jr.sleep", args=(4,), kwargs={"tag": "t"}, queue=queue)
    wait_until((tmp_path / "started-t").exists, what="the task to start")

    def state() -> str:
        with engine.connect() as conn:
            return str(conn.execute(select(tables.incarnations.c.state)).scalar())

    worker.proc.send_signal(15)
    wait_until(lambda: state() == "draining", timeout=10, what="draining")
    assert worker.proc.wait(timeout=60) == 0
    assert state() == "stopped"
    with engine.connect() as conn:
        job = conn.execute(select(tables.jobs).where(tables.jobs.c.task_id == result.id)).one()
    assert job.status == "succeeded" and job.fence is None
    sender.close()


# --- dead is not forever (a paused worker that comes back) ----------------------------------


def test_mark_dead_does_not_remark_an_incarnation_that_heartbeated_since(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Judged dead on a stale heartbeat; it beats before the verdict is written: still live."""
    from datetime import timedelta

    from sqlalchemy import update

    from celery_jobreaper.clock import utcnow
    from celery_jobreaper.liveness import Incarnation, Liveness, mark_dead
    from celery_jobreaper.schema import create_all

    engine = engine_for(db_url)
    create_all(engine)
    liveness = Liveness(tables, heartbeat_timeout=3, heartbeat_interval=1)
    paused = Incarnation("p" * 32, "paused@h", "h", 1, utcnow() - timedelta(minutes=5))
    t = tables.incarnations
    with engine.begin() as conn:
        liveness.register(conn, paused)
        old = utcnow() - timedelta(minutes=5)  # its last heartbeat: 5 minutes ago
        conn.execute(update(t).where(t.c.id == paused.id).values(heartbeat_at=old))
    silent = lambda nodes, timeout: set()  # noqa: E731
    with engine.begin() as conn:
        view = liveness.assess(
            conn, me=None, incarnation_ids={paused.id}, ping=silent, ping_timeout=0.1
        )
    assert paused.id in view.dead_incarnations
    with engine.begin() as conn:
        assert liveness.heartbeat(conn, paused)  # it wakes up and beats
    with engine.begin() as conn:
        mark_dead(conn, tables, view)
    with engine.connect() as conn:
        state = conn.execute(
            select(tables.incarnations.c.state).where(tables.incarnations.c.id == paused.id)
        ).scalar()
    assert state == "running"


def test_an_incarnation_found_dead_earlier_is_judged_again(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """A dead verdict is not forever: fresh heartbeat or a ping reply makes it live again."""
    from datetime import timedelta

    from sqlalchemy import update

    from celery_jobreaper.clock import utcnow
    from celery_jobreaper.liveness import Incarnation, Liveness
    from celery_jobreaper.schema import create_all

    engine = engine_for(db_url)
    create_all(engine)
    t = tables.incarnations
    liveness = Liveness(tables, heartbeat_timeout=3, heartbeat_interval=1)
    back = Incarnation("b" * 32, "back@h", "h", 1, utcnow() - timedelta(minutes=5))
    with engine.begin() as conn:
        liveness.register(conn, back)
        conn.execute(update(t).where(t.c.id == back.id).values(state="dead"))
    answers = lambda nodes, timeout: set(nodes)  # noqa: E731
    with engine.begin() as conn:
        view = liveness.assess(
            conn, me=None, incarnation_ids={back.id}, ping=answers, ping_timeout=0.1
        )
    assert back.id not in view.dead_incarnations and back.id in view.live_incarnations
    with engine.begin() as conn:  # fresh heartbeat while still marked dead (no ping at all)
        conn.execute(update(t).where(t.c.id == back.id).values(heartbeat_at=utcnow()))
        view = liveness.assess(
            conn, me=None, incarnation_ids={back.id}, ping=None, ping_timeout=0.1
        )
    assert back.id not in view.dead_incarnations and back.id in view.live_incarnations


def test_a_stale_incarnation_owning_no_candidate_is_live_if_it_answers(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Woken from a long pause, a worker with a stale heartbeat owns no candidate (its jobs
    have no owner column) but answers: it counts as another live worker (DESIGN §2.1, two
    signals). Silent, it is dead on both signals and counts for nothing."""
    from datetime import timedelta

    from sqlalchemy import update

    from celery_jobreaper.clock import utcnow
    from celery_jobreaper.liveness import Incarnation, Liveness, mark_dead
    from celery_jobreaper.schema import create_all

    engine = engine_for(db_url)
    create_all(engine)
    t = tables.incarnations
    liveness = Liveness(tables, heartbeat_timeout=3, heartbeat_interval=1)
    woken = Incarnation("w" * 32, "woken@h", "h", 1, utcnow() - timedelta(minutes=5))
    with engine.begin() as conn:
        liveness.register(conn, woken)
        old = utcnow() - timedelta(minutes=5)
        conn.execute(update(t).where(t.c.id == woken.id).values(heartbeat_at=old))
    answers = lambda nodes, timeout: set(nodes)  # noqa: E731
    with engine.begin() as conn:
        view = liveness.assess(conn, me=None, ping=answers, ping_timeout=0.1)
    assert view.other_live_workers == 1 and woken.id in view.live_incarnations
    silent = lambda nodes, timeout: set()  # noqa: E731
    with engine.begin() as conn:
        view = liveness.assess(conn, me=None, ping=silent, ping_timeout=0.1)
        mark_dead(conn, tables, view)
    assert view.other_live_workers == 0 and woken.id in view.dead_incarnations
    with engine.connect() as conn:
        state = conn.execute(select(t.c.state).where(t.c.id == woken.id)).scalar()
    assert state == "dead"  # judged on both signals: not pinged again by later reaps


def test_start_is_read_on_the_host_clock_as_it_is_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host clock stepped back 90 s after 100 s up: rows this worker stamps now look 90 s
    older, so its start is moved back as far (never forward when the clock steps ahead)."""
    from datetime import timedelta

    from celery_jobreaper import incarnation
    from celery_jobreaper.incarnation import Incarnation

    me = Incarnation.new("n@h")
    assert me.started_monotonic is not None
    up = me.started_monotonic + 100.0
    monkeypatch.setattr(incarnation, "monotonic", lambda: up)
    for step, start in (
        (-90, me.started_at - timedelta(seconds=90)),
        (0, me.started_at),
        (90, me.started_at),
    ):
        now = me.started_at + timedelta(seconds=100 + step)
        monkeypatch.setattr(incarnation, "utcnow", lambda now=now: now)
        moved = me.as_of_now()
        assert moved.started_at == start and (moved.id, moved.node) == (me.id, me.node)


def test_alone_by_the_table_is_confirmed_by_a_ping_of_every_worker(
    db_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Finding B: an incarnation marked dead (paused past the timeout) is not a suspect any
    more; woken, it runs jobs before its next heartbeat. With ``confirm_alone`` (jobs without
    owner to judge) a table showing no other live worker is checked with one ping of every
    worker: a reply counts as a live worker, this process's own never does (the pinger leaves
    it out), and a ping that fails is no verdict."""
    from datetime import timedelta

    from sqlalchemy import update

    from celery_jobreaper.clock import utcnow
    from celery_jobreaper.liveness import Incarnation, Liveness, LivenessView, Pinger
    from celery_jobreaper.schema import create_all

    engine = engine_for(db_url)
    create_all(engine)
    t = tables.incarnations
    liveness = Liveness(tables, heartbeat_timeout=3, heartbeat_interval=1)
    woken = Incarnation("w" * 32, "woken@h", "h", 1, utcnow() - timedelta(minutes=5))
    me = Incarnation.new("me@h")
    with engine.begin() as conn:
        liveness.register(conn, woken)
        liveness.register(conn, me)
        old = utcnow() - timedelta(minutes=5)
        conn.execute(update(t).where(t.c.id == woken.id).values(heartbeat_at=old, state="dead"))
    asked: list[Collection[str] | None] = []

    def answers(nodes: Collection[str] | None, timeout: float) -> set[str]:
        asked.append(nodes)
        return {"woken@h"}

    def down(nodes: Collection[str] | None, timeout: float) -> set[str]:
        raise ConnectionError("broker unreachable")

    def assess(ping: Pinger, confirm: bool) -> LivenessView:
        with engine.begin() as conn:
            return liveness.assess(conn, me=me, ping=ping, ping_timeout=0.1, confirm_alone=confirm)

    view = assess(answers, False)
    assert view.other_live_workers == 0 and asked == []
    view = assess(answers, True)
    assert view.other_live_workers == 1 and asked == [None]
    view = assess(lambda nodes, timeout: set(), True)
    assert view.other_live_workers == 0
    view = assess(down, True)
    assert view.other_live_workers == 1 and view.ping_failed
