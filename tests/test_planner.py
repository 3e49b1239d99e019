"""The planner's rules, on hand-made liveness views (pure: no database, no broker)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery import Celery

from celery_jobreaper import Settings
from celery_jobreaper.liveness import Incarnation, LivenessView
from celery_jobreaper.planner import TaskFacts, decide
from celery_jobreaper.rules import (
    NO_LIVE_WORKER_LEFT,
    START_UNKNOWN_SEEN_BRIEFLY,
    YOUNGER_THAN_HEARTBEAT_TIMEOUT,
)
from celery_jobreaper.sources.base import Candidate

NOW = datetime(2026, 11, 28, 12, 0, 0)
ME = Incarnation("me" * 16, "w1@h", "h", 100, NOW - timedelta(seconds=5))


def settings(**conf: Any) -> Settings:
    app = Celery("t", set_as_current=False)
    app.conf.jobreaper_database_url = "sqlite://"
    for key, value in conf.items():
        app.conf[f"jobreaper_{key}"] = value
    return Settings.from_app(app)


def view(**kw: Any) -> LivenessView:
    return LivenessView(me=kw.pop("me", ME), now=NOW, **kw)


NO_TASKS = TaskFacts()


def job(**kw: Any) -> Candidate:
    base: dict[str, Any] = {
        "source": "system_jobs",
        "job_id": "j1",
        "status": "running",
        "kind": "library_scan",
        "started_at": NOW - timedelta(days=1),
    }
    base.update(kw)
    return Candidate(**base)


def test_seed_rule_no_owner_and_no_other_live_worker_fails_with_age() -> None:
    d = decide(job(), view(other_live_workers=0), NO_TASKS, settings())
    assert d.verdict == "fail"
    assert d.error is not None and "was running for 1 day, 0:00:00" in d.error


def test_no_owner_with_other_live_workers_is_left_alone_unless_older_than_max_age() -> None:
    v = view(other_live_workers=2)
    assert decide(job(), v, NO_TASKS, settings()).verdict == "leave"
    assert decide(job(), v, NO_TASKS, settings(max_age=3600)).verdict == "fail"
    young = job(started_at=NOW - timedelta(minutes=5))
    assert decide(young, v, NO_TASKS, settings(max_age=3600)).verdict == "leave"


def test_grace_protects_young_jobs() -> None:
    young = job(started_at=NOW - timedelta(seconds=10))
    d = decide(young, view(other_live_workers=0), NO_TASKS, settings(grace=30))
    assert d.verdict == "leave" and "grace" in d.reason


def test_policy_ignore_by_kind() -> None:
    d = decide(
        job(kind="system.backup"), view(), NO_TASKS, settings(policies={"system.*": "ignore"})
    )
    assert d.verdict == "leave" and "policy" in d.reason


def test_tracked_job_of_dead_incarnation_fails_live_one_is_left() -> None:
    v = view(dead_incarnations={"dead1": "w2@h, which stopped"}, live_incarnations={"live1"})
    assert (
        decide(job(incarnation_id="dead1", owner="w2@h"), v, NO_TASKS, settings()).verdict == "fail"
    )
    assert (
        decide(job(incarnation_id="live1", owner="w3@h"), v, NO_TASKS, settings()).verdict
        == "leave"
    )
    # unknown incarnation: never settled
    assert (
        decide(job(incarnation_id="other", owner="w4@h"), v, NO_TASKS, settings()).verdict
        == "leave"
    )


def test_owner_column_own_node_earlier_start_fails_current_start_is_left() -> None:
    v = view()
    earlier = job(owner="w1@h", started_at=ME.started_at - timedelta(seconds=1))
    current = job(owner="w1@h", started_at=ME.started_at + timedelta(seconds=1))
    assert decide(earlier, v, NO_TASKS, settings()).verdict == "fail"
    assert decide(current, v, NO_TASKS, settings()).verdict == "leave"


def test_owner_column_dead_live_and_unknown_nodes() -> None:
    v = view(dead_nodes={"w2@h": "w2@h, which stopped"}, live_nodes={"w3@h"})
    assert decide(job(owner="w2@h"), v, NO_TASKS, settings()).verdict == "fail"
    assert decide(job(owner="w3@h"), v, NO_TASKS, settings()).verdict == "leave"
    unknown = decide(job(owner="w9@h"), v, NO_TASKS, settings())
    assert unknown.verdict == "leave" and "unknown" in unknown.reason
    assert decide(job(owner="w9@h"), v, NO_TASKS, settings(max_age=60)).verdict == "fail"


def test_live_task_id_is_never_settled() -> None:
    v = view(other_live_workers=0, dead_nodes={"w2@h": "w2@h, which stopped"})
    held_by_peer = TaskFacts(held_by_peers=frozenset({"t-1"}))
    d = decide(job(task_id="t-1", owner="w2@h"), v, held_by_peer, settings())
    assert d.verdict == "leave" and "live worker" in d.reason
    held_here = TaskFacts(held_here=frozenset({"t-1"}))
    assert decide(job(task_id="t-1", owner="w2@h"), v, held_here, settings()).verdict == "leave"


def test_refused_duplicate_node_is_left_alone() -> None:
    v = view(refused_nodes={"w1@h": "another live worker answers to this node name"})
    d = decide(
        job(owner="w1@h", started_at=ME.started_at - timedelta(days=1)), v, NO_TASKS, settings()
    )
    assert d.verdict == "leave" and "refused" in d.reason


def test_this_worker_holding_any_task_protects_jobs_without_owner() -> None:
    """Item 1: this worker is a live worker too; after its startup reap it may run any job."""
    v = view(other_live_workers=0)
    busy = TaskFacts(held_here=frozenset({"some-task"}))
    d = decide(job(), v, busy, settings())
    assert d.verdict == "leave" and "this one or another" in d.reason
    assert decide(job(), v, busy, settings(max_age=3600)).verdict == "fail"
    assert decide(job(), v, NO_TASKS, settings()).verdict == "fail"


def test_own_node_row_without_start_time_is_not_an_earlier_start() -> None:
    d = decide(job(owner="w1@h", started_at=None), view(), NO_TASKS, settings())
    assert d.verdict == "leave"


def test_job_with_task_id_not_held_here_is_not_protected_by_other_held_tasks() -> None:
    """This worker's held set is exact: a task id it does not hold is not running here."""
    v = view(other_live_workers=0)
    busy = TaskFacts(held_here=frozenset({"another"}))
    assert decide(job(task_id="t-x"), v, busy, settings()).verdict == "fail"
    assert decide(job(task_id="another"), v, busy, settings()).verdict == "leave"
    assert decide(job(task_id="t-x"), view(other_live_workers=1), busy, settings()).verdict == (
        "leave"
    )


def test_own_node_row_without_task_id_is_an_earlier_start_only_while_this_worker_holds_none() -> (
    None
):
    """Finding A: ``started_at`` of a table with an owner but no task-id column is stamped by
    the writer's clock; a host clock stepped back (or a writer behind) makes a job this very
    worker runs look older than its start. While this worker holds any task, such a row may
    be one of them, whatever the clocks say: only ``max_age`` settles it. Holding none (before
    consuming, or idle) no task of this worker can be running it: an earlier start's job is
    settled at once; one of this start (a pool process died) once older than a heartbeat
    interval."""
    v = view(other_live_workers=0)
    busy = TaskFacts(held_here=frozenset({"some-task"}))
    long_before = job(owner=ME.node, started_at=ME.started_at - timedelta(days=1))
    d = decide(long_before, v, busy, settings())
    assert d.verdict == "leave" and "holds tasks" in d.reason
    assert decide(long_before, v, busy, settings(max_age=3600)).verdict == "fail"
    d = decide(long_before, v, NO_TASKS, settings())
    assert d.verdict == "fail" and "an earlier start of this worker" in d.reason
    after = job(owner=ME.node, started_at=ME.started_at + timedelta(seconds=1))
    assert decide(after, v, busy, settings()).verdict == "leave"
    d = decide(after, view(), NO_TASKS, settings(heartbeat_interval=2))
    assert d.verdict == "fail" and "holds no task" in d.reason
    assert decide(after, view(), NO_TASKS, settings(heartbeat_interval=10)).verdict == "leave"
    undecided = view(undecided_nodes={ME.node: "an earlier start heartbeated moments ago"})
    assert decide(long_before, undecided, NO_TASKS, settings()).verdict == "leave"
    assert decide(after, undecided, NO_TASKS, settings(heartbeat_interval=2)).verdict == "leave"


def test_no_live_worker_fails_a_job_without_owner_only_past_the_heartbeat_timeout() -> None:
    """A worker marked dead during a pause may have woken and started a job before its first
    heartbeat (and, busy, answer no ping): "no live worker" needs the job older than
    ``heartbeat_timeout`` (or ``max_age``, if shorter); a job whose start is unknown needs to
    have been seen by this reaper for that long (its first sighting, in the task facts)."""
    alone = view(other_live_workers=0)
    s = settings(heartbeat_timeout=60)
    for task_id in (None, "t1"):
        young = job(started_at=NOW - timedelta(seconds=59), task_id=task_id)
        d = decide(young, alone, NO_TASKS, s)
        assert (d.verdict, d.reason) == ("leave", YOUNGER_THAN_HEARTBEAT_TIMEOUT)
        old = job(started_at=NOW - timedelta(seconds=61), task_id=task_id)
        d = decide(old, alone, NO_TASKS, s)
        assert (d.verdict, d.reason) == ("fail", NO_LIVE_WORKER_LEFT)
        unknown = job(started_at=None, task_id=task_id)
        d = decide(unknown, alone, NO_TASKS, s)  # never seen before
        assert (d.verdict, d.reason) == ("leave", START_UNKNOWN_SEEN_BRIEFLY)
        for seen, verdict in ((59, "leave"), (61, "fail")):
            facts = TaskFacts(first_seen={unknown.job_id: NOW - timedelta(seconds=seen)})
            assert decide(unknown, alone, facts, s).verdict == verdict
        # grace and max_age speak of the real age, which is unknown: neither applies
        long_seen = TaskFacts(first_seen={unknown.job_id: NOW - timedelta(days=1)})
        graced = settings(heartbeat_timeout=60, grace=3600)
        assert decide(unknown, alone, long_seen, graced).verdict == "fail"
        crowded = view(other_live_workers=1)
        d = decide(unknown, crowded, long_seen, settings(heartbeat_timeout=60, max_age=30))
        assert d.verdict == "leave"
    shorter = settings(heartbeat_timeout=60, max_age=30)
    d = decide(job(started_at=NOW - timedelta(seconds=31)), alone, NO_TASKS, shorter)
    assert (d.verdict, d.reason) == ("fail", NO_LIVE_WORKER_LEFT)
    d = decide(job(started_at=NOW - timedelta(seconds=29)), alone, NO_TASKS, shorter)
    assert d.verdict == "leave"
