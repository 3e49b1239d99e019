"""Running the model test: against a database URL, by Hypothesis or replaying given steps."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

from celery import Celery
from clustermodel import ClusterModel
from hypothesis import HealthCheck, Phase, Verbosity
from hypothesis import settings as hypothesis_settings
from hypothesis.stateful import run_state_machine_as_test
from modelworld import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    INTERVAL,
    USER_TABLES,
    Env,
    HostClock,
    ModelTime,
    user_table,
)
from sqlalchemy import MetaData

from celery_jobreaper import clock, reaper
from celery_jobreaper.database import Database
from celery_jobreaper.schema import create_all
from celery_jobreaper.settings import Settings


@contextlib.contextmanager
def model_for(url: str, machine: type[ClusterModel] = ClusterModel) -> Iterator[type[ClusterModel]]:
    """*machine* bound to the database at *url* (tables made once, emptied per example), with the
    simulated host clocks installed."""
    app = Celery("jobreaper_model", set_as_current=False)
    metadata = MetaData()
    user = {
        name: user_table(metadata, name, owner=owner, task_id=task)
        for name, (owner, task) in USER_TABLES.items()
    }
    sources = [
        {
            "table": table,
            "name": name,
            "id": "job_id",
            "status": "status",
            "kind": "job_type",
            "started_at": "started_at",
            "completed_at": "completed_at",
            "error": "error",
            "owner": "owner" if "owner" in table.c else None,
            "task_id": "task_id" if "task_id" in table.c else None,
        }
        for name, table in user.items()
    ]
    settings = Settings.from_app(
        app,
        database_url=url,
        sources=sources,
        track_tasks=True,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        interval=INTERVAL,
        ping_timeout=0.1,
        queue_cleanup="off",
        create_tables=False,
    )
    db = Database.from_settings(settings)
    try:
        create_all(db.engine)
        metadata.create_all(db.engine)
        env = Env(db=db, app=app, settings=settings, user=user, waits=ModelTime())
        with (
            mock.patch.object(clock, "datetime", HostClock),
            mock.patch.object(reaper, "time", env.waits),
            mock.patch.object(clock, "time", env.waits),
        ):
            yield type(machine.__name__, (machine,), {"env": env})
    finally:
        db.dispose()
        app.close()


def run_model(machine: type[ClusterModel], url: str, *, examples: int, steps: int) -> None:
    """Let Hypothesis run *machine* against the database at *url*."""
    config = hypothesis_settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=not os.environ.get("JR_MODEL_RANDOM"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        print_blob=False,
        # Shrinking a failure takes minutes (Hypothesis's limit is 5): on demand only.
        phases=[Phase.explicit, Phase.generate]
        + ([Phase.shrink] if os.environ.get("JR_MODEL_SHRINK") else []),
        report_multiple_bugs=False,
        verbosity=Verbosity.verbose if os.environ.get("JR_MODEL_VERBOSE") else Verbosity.normal,
    )
    with model_for(url, machine) as bound:
        run_state_machine_as_test(bound, settings=config)


def replay(url: str, steps: list[tuple[str, dict[str, Any]]]) -> ClusterModel:
    """Run *steps* (rule name, arguments), as Hypothesis prints a failing case, checking the
    invariants after each; the state at the end."""
    with model_for(url) as model:
        state = model()
        state.settled_exactly_once_and_within_the_bound()
        for name, arguments in steps:
            getattr(state, name)(**arguments)
            state.settled_exactly_once_and_within_the_bound()
        return state
