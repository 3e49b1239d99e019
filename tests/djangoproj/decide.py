"""``python -m djangoproj.decide``: write result rows through django-celery-results' backend
as a worker does, reap once with ``celery_jobreaper.reap(app)``, and print the report and each
row's state read back through ``AsyncResult`` as JSON."""

from __future__ import annotations

import json
from datetime import timedelta

from celery import states
from celery.app.task import Context
from django.utils import timezone

import celery_jobreaper
from djangoproj.celery import app
from djangoproj.check import describe


def write() -> None:
    """The rows: a dead worker's; one of a node never registered, just started (its age, from
    ``date_started``, is below the heartbeat timeout); a success; and (with extended results)
    a dead worker's row naming it only in the worker column. The dead worker's rows started an
    hour ago, before its last heartbeat (a row of a node found dead that started after its
    last heartbeat waits for the heartbeat timeout: the node may be back from a pause)."""
    backend = app.backend
    for task_id, node in (("t-dead", "dead@h"), ("t-young", "ghost@h")):
        backend.store_result(task_id, {"pid": 1, "hostname": node}, states.STARTED)
    backend.store_result("t-done", 42, states.SUCCESS)
    app.conf.result_extended = True
    request = Context(hostname="dead@h", task="proj.crunch", args=(), kwargs={})
    backend.store_result("t-ext", {"pid": 1}, states.STARTED, request=request)
    from django_celery_results.models import TaskResult  # (once the app made Django ready)

    an_hour_ago = timezone.now() - timedelta(hours=1)
    TaskResult.objects.filter(task_id__in=("t-dead", "t-ext")).update(date_started=an_hour_ago)


if __name__ == "__main__":
    write()
    report = celery_jobreaper.reap(app)
    ids = ("t-dead", "t-young", "t-done", "t-ext")
    print(
        json.dumps(
            {
                "settled": report.settled,
                "per_source": dict(report.per_source),
                "rows": {task_id: describe(task_id) for task_id in ids},
            }
        )
    )
