"""Signals jobreaper sends, for metrics, webhooks and audit hooks (Celery's ``Signal`` class)."""

from __future__ import annotations

from celery.utils.dispatch import Signal

#: Sent after each committed batch: ``decisions`` (list of planner decisions), ``source``.
jobs_settled = Signal(name="jobreaper_jobs_settled", providing_args=["decisions", "source"])
#: Sent after every reap run: ``report`` (:class:`celery_jobreaper.report.Report`).
reap_finished = Signal(name="jobreaper_reap_finished", providing_args=["report"])
#: Sent when a settled job is completed late: ``task_id``, ``status`` (the late one), ``node``
#: (the old owner, ``None`` when unknown), ``source`` (the job table's name) and ``job_id``.
#: Tracked jobs: the finish was refused (fenced). User tables: the application's own write was
#: applied and detected by a later reap (``task_id`` / ``node`` ``None`` without such columns).
late_result = Signal(
    name="jobreaper_late_result",
    providing_args=["task_id", "status", "node", "source", "job_id"],
)
