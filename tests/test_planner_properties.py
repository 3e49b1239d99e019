"""Properties of the pure planner on random liveness views (DESIGN §2.1, §4); no I/O.

What a candidate's owner, task and age look like, and what the view says about them, is drawn
at random from small pools of ids, so that every combination (owner live, dead, refused,
unknown; task held, queued; old, young, no start time) comes up. Whatever the mix, a job
proved alive is never failed. ``build_view`` and ``decide_all`` are the one place to adapt
when the planner's signature changes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from hypothesis import example, given, settings
from hypothesis import strategies as st

from celery_jobreaper import Settings
from celery_jobreaper.liveness import Incarnation, LivenessView
from celery_jobreaper.planner import Decision, TaskFacts, decide, plan
from celery_jobreaper.sources.base import Candidate

NOW = datetime(2026, 11, 28, 12, 0, 0)
ME = Incarnation("me" * 16, "me@h", "h", 100, NOW - timedelta(minutes=5))
INCARNATIONS = ("i1", "i2", "i3", ME.id)
NODES = ("a@h", "b@h", "c@h", ME.node)
TASKS = ("t1", "t2", "t3")
MAX_AGE = 3600.0


def make_settings(*, max_age: float | None, grace: float, ignore_b: bool) -> Settings:
    app = Celery("props", set_as_current=False)
    return Settings.from_app(
        app,
        database_url="sqlite://",
        max_age=max_age,
        grace=grace,
        policies={"b": "ignore"} if ignore_b else {},
    )


SETTINGS = {
    (max_age, grace, ignore): make_settings(max_age=max_age, grace=grace, ignore_b=ignore)
    for max_age in (None, MAX_AGE)
    for grace in (0.0, 30.0)
    for ignore in (False, True)
}


@st.composite
def views(draw: st.DrawFn) -> dict[str, Any]:
    """Disjoint live / dead / unknown incarnations and nodes (the view's fields)."""

    def split(pool: tuple[str, ...]) -> tuple[set[str], set[str]]:
        fate = draw(
            st.lists(
                st.sampled_from(("live", "dead", "unknown")), min_size=len(pool), max_size=len(pool)
            )
        )
        return (
            {x for x, f in zip(pool, fate, strict=True) if f == "live"},
            {x for x, f in zip(pool, fate, strict=True) if f == "dead"},
        )

    me = draw(st.sampled_from((ME, None)))
    live_inc, dead_inc = split(INCARNATIONS)
    live_nodes, dead_nodes = split(NODES)
    refused = draw(st.sets(st.sampled_from(NODES), max_size=1))
    return {
        "me": me,
        "live_incarnations": live_inc,
        "dead_incarnations": {i: f"{i}, which stopped" for i in dead_inc},
        "live_nodes": live_nodes,
        "dead_nodes": {n: f"{n}, which stopped" for n in dead_nodes - refused},
        "refused_nodes": {n: "duplicate node name" for n in refused},
        "undecided_nodes": draw(
            st.sampled_from(({}, {ME.node: "an earlier start heartbeated moments ago"}))
        ),
        "other_live_workers": draw(st.integers(0, 3)),
    }


task_facts = st.builds(
    TaskFacts,
    held_here=st.frozensets(st.sampled_from(TASKS), max_size=1),
    held_by_peers=st.frozensets(st.sampled_from(TASKS), max_size=1),
    queued=st.frozensets(st.sampled_from(TASKS), max_size=1),
    first_seen=st.dictionaries(
        st.integers(1, 5),
        (st.integers(0, 40) | st.integers(0, 3 * 86400)).map(lambda s: NOW - timedelta(seconds=s)),
        max_size=3,
    ),
)


candidates = st.builds(
    Candidate,
    source=st.just("system_jobs"),
    job_id=st.integers(1, 5),
    status=st.sampled_from(("running", "scheduled")),
    kind=st.sampled_from(("a", "b", None)),
    started_at=st.none()
    | (st.integers(0, 20) | st.integers(0, 600) | st.integers(0, 3 * 86400)).map(
        lambda s: NOW - timedelta(seconds=s)
    ),
    owner=st.none() | st.sampled_from(NODES),
    incarnation_id=st.none() | st.sampled_from(INCARNATIONS),
    task_id=st.none() | st.sampled_from(TASKS),
)
setting_keys = st.sampled_from(sorted(SETTINGS, key=repr))


def build_view(kw: dict[str, Any]) -> LivenessView:
    return LivenessView(now=NOW, **kw)


def decide_all(
    cands: list[Candidate], view: LivenessView, facts: TaskFacts, conf: Settings
) -> list[Decision]:
    return plan(cands, view, facts, conf)


def _young(c: Candidate, seconds: float, *, strict: bool = False) -> bool:
    """Whether *c* started at most (*strict*: less than) *seconds* ago (``False`` if its
    start is unknown)."""
    if c.started_at is None:
        return False
    age, limit = NOW - c.started_at, timedelta(seconds=seconds)
    return age < limit if strict else age <= limit


def _seen_for_more_than(facts: TaskFacts, c: Candidate, seconds: float) -> bool:
    """Whether this reaper first saw *c* more than *seconds* ago."""
    first = facts.first_seen.get(c.job_id)
    return first is not None and NOW - first > timedelta(seconds=seconds)


# A row of this worker's current start whose task it does not hold, 5 s old: younger than a
# heartbeat interval (its message may be only now being taken). Rare at random, so given.
_MARGIN = {
    "view_kw": {
        "me": ME,
        "live_incarnations": set(),
        "dead_incarnations": {},
        "live_nodes": set(),
        "dead_nodes": {},
        "refused_nodes": {},
        "undecided_nodes": {},
        "other_live_workers": 0,
    },
    "facts": TaskFacts(),
    "cands": [
        Candidate("system_jobs", 1, "running", "a", NOW - timedelta(seconds=5), ME.node, None, "t1")
    ],
    "key": (None, 0.0, False),
}


# Finding A: a row of this node name without task id that looks a day older than this start
# (the host clock stepped back), while this worker holds a task.
_CLOCK_STEP = {
    **_MARGIN,
    "facts": TaskFacts(held_here=frozenset({"t2"})),
    "cands": [Candidate("system_jobs", 1, "running", "a", NOW - timedelta(days=1), ME.node)],
}


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@example(**_MARGIN)
@example(**_CLOCK_STEP)
@given(view_kw=views(), facts=task_facts, cands=st.lists(candidates, max_size=6), key=setting_keys)
def test_a_job_proved_alive_is_never_failed(
    view_kw: dict[str, Any], facts: TaskFacts, cands: list[Candidate], key: tuple[Any, ...]
) -> None:
    conf = SETTINGS[key]
    view = build_view(view_kw)
    decisions = decide_all(cands, view, facts, conf)
    assert [d.candidate for d in decisions] == cands
    # pure: deciding again, or one at a time, gives the same answers
    assert decisions == [decide(c, view, facts, conf) for c in cands]
    mine = view.me is not None
    for d in decisions:
        c = d.candidate
        why = None
        if c.task_id is not None and c.task_id in facts.held_here:
            why = "its task is held by this worker"
        elif c.task_id is not None and c.task_id in facts.held_by_peers:
            why = "its task is held by a live peer"
        elif c.task_id is not None and c.task_id in facts.queued:
            why = "its message waits in a queue"
        elif c.incarnation_id is not None and c.incarnation_id in view.live_incarnations:
            why = "its owner incarnation is alive"
        elif c.incarnation_id is None and c.owner is not None and c.owner in view.refused_nodes:
            why = "its owner's node name is refused (duplicate)"
        elif (
            c.incarnation_id is None
            and c.owner is not None
            and not view.node_is_me(c.owner)
            and c.owner in view.live_nodes
        ):
            why = "its owner node is alive"
        elif c.kind == "b" and key[2]:
            why = "policy 'ignore'"
        elif c.incarnation_id is None and view.node_is_me(c.owner) and c.started_at is None:
            why = "owned by this node name, start time unknown"
        elif (
            c.incarnation_id is None
            and view.node_is_me(c.owner)
            and c.task_id is None
            and facts.held_here
            and conf.max_age is None
        ):
            # whatever the clocks say: the host's may have stepped back since this start
            why = "owned by this node name, no task id, and this worker holds tasks"
        elif (
            c.incarnation_id is None
            and view.node_is_me(c.owner)
            and view.me is not None
            and c.started_at is not None
            and c.started_at >= view.me.started_at
            and _young(c, conf.heartbeat_interval)
        ):
            why = "this worker's current start, younger than a heartbeat interval"
        elif (
            c.incarnation_id is None
            and view.node_is_me(c.owner)
            and view.me is not None
            and ME.node in view.undecided_nodes
        ):
            why = "an earlier start of this node name is not judged yet"
        elif (
            c.owner is None
            and c.incarnation_id is None
            and (view.other_live_workers or (mine and facts.held_here and c.task_id is None))
            and (conf.max_age is None)
        ):
            why = "no owner recorded and a live worker (this one or another) may run it (§4)"
        elif c.owner is None and c.incarnation_id is None and _young(c, conf.grace, strict=True):
            why = "younger than jobreaper_grace"
        elif (
            c.owner is None
            and c.incarnation_id is None
            and c.started_at is None
            and not _seen_for_more_than(facts, c, min(conf.heartbeat_timeout, conf.max_age or 1e9))
        ):
            # a worker woken from a pause may have written it before its first heartbeat
            why = "start unknown, and this reaper has not seen it for the heartbeat timeout"
        if why is not None:
            assert d.verdict == "leave", f"{c} failed although {why}: {d.reason}"
        if d.verdict == "fail":
            assert d.error is not None and c.status in d.error, d
