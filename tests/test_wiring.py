"""The run's one-way data flow: the Reaper gets its sweep in the constructor, reads the queues
through it at most once per run, hands it what the run settled, and assembles the report from
what the sweep returns (real SQLite; the sweep collaborator is a recording stand-in)."""

from __future__ import annotations

from collections.abc import Callable

from jobtables import SEED_SOURCE, create_seed
from sqlalchemy import select
from sqlalchemy.engine import Engine
from support import make_app

from celery_jobreaper import Settings
from celery_jobreaper.broker.result import SweepResult
from celery_jobreaper.database import Database
from celery_jobreaper.liveness import Incarnation
from celery_jobreaper.reaper import Reaper
from celery_jobreaper.settled import Settled
from celery_jobreaper.vocabulary import PERIODIC


class RecordingSweep:
    """Says which task ids wait in the queues; keeps what each run handed it."""

    def __init__(self, queued: set[str], result: SweepResult | None) -> None:
        self.queued = queued
        self.result = result
        self.reads = 0
        self.received: list[Settled] = []

    def queued_task_ids(self) -> set[str]:
        self.reads += 1
        return set(self.queued)

    def sweep(self, run: Settled) -> SweepResult | None:
        self.received.append(run)
        return self.result


def test_sweep_is_a_constructor_collaborator_and_the_report_is_assembled_from_results(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(sqlite_url)
    table = create_seed(
        engine,
        [
            {"job_id": "a-queued", "task_id": "t-queued"},
            {"job_id": "b-gone", "task_id": "t-gone"},
            {"job_id": "c-gone", "task_id": "t-gone-too"},
        ],
        task_id=True,
    )
    # one job a batch: the queues are still read once for the whole run
    app = make_app(sqlite_url, sources=[{**SEED_SOURCE, "task_id": "task_id"}], batch_size=1)
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    sweep = RecordingSweep(
        {"t-queued"}, SweepResult(removed=[("t-gone", "q")], unparsable=2, neutralized=1)
    )
    reaper = Reaper(
        app,
        settings,
        db,
        me=Incarnation.new("me@h"),
        ping=lambda nodes, timeout: set(),
        ask=lambda nodes, ids, timeout: set(),
        held=set,
        sweep=sweep,
    )
    assert not hasattr(reaper, "after_settle") and not hasattr(reaper, "queued_ids")
    try:
        report = reaper.run(PERIODIC)
        assert sweep.reads == 1
        [run] = sweep.received
        assert run.task_ids == {"t-gone", "t-gone-too"}
        assert (run.trigger, run.dry_run, run.run_id) == (PERIODIC, False, report.run_id)
        assert run.started_at == report.started_at
        assert report.settled == 2 and report.candidates == 3
        assert report.broker == {
            "removed": 1,
            "restored": 0,
            "dropped_unacked": 0,
            "unparsable": 2,
            "neutralized": 1,
        }
        with engine.connect() as conn:
            status = {r.job_id: r.status for r in conn.execute(select(table))}
        assert status == {"a-queued": "running", "b-gone": "failed", "c-gone": "failed"}

        # next run: read once again; a sweep that left the queues alone reports nothing
        sweep.result = None
        report = reaper.run(PERIODIC)
        assert sweep.reads == 2 and len(sweep.received) == 2
        assert sweep.received[1].task_ids == frozenset() and report.broker == {}
        sweep.result = SweepResult(failed=True)
        assert reaper.run(PERIODIC).broker == {"errors": 1}
    finally:
        db.dispose()


class UnreadableQueues(RecordingSweep):
    """The broker cannot be read this time (a Redis blip, a timeout)."""

    def queued_task_ids(self) -> set[str]:
        self.reads += 1
        raise ConnectionError("Redis: connection reset by peer")


def test_queues_that_cannot_be_read_are_unknown_not_empty(
    sqlite_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """A failed queue read is "don't know": a job with a task id (whose message, a retry say,
    may wait there) is left alone that run; one without a task id is judged as usual."""
    engine = engine_for(sqlite_url)
    table = create_seed(
        engine,
        [{"job_id": "retrying", "task_id": "t-retry"}, {"job_id": "plain", "task_id": None}],
        task_id=True,
    )
    app = make_app(sqlite_url, sources=[{**SEED_SOURCE, "task_id": "task_id"}])
    settings = Settings.from_app(app)
    db = Database.from_settings(settings)
    sweep = UnreadableQueues(set(), None)
    reaper = Reaper(
        app,
        settings,
        db,
        me=None,  # reap() from a process that is not a worker; no live worker anywhere
        ping=lambda nodes, timeout: set(),
        ask=lambda nodes, ids, timeout: set(),
        sweep=sweep,
    )
    try:
        report = reaper.run(PERIODIC)
    finally:
        db.dispose()
    assert sweep.reads == 1
    with engine.connect() as conn:
        got = {r.job_id: r.status for r in conn.execute(select(table.c.job_id, table.c.status))}
    assert got == {"retrying": "running", "plain": "failed"}
    assert report.left_alone == {"could not read the queues; its message may still be waiting": 1}
