"""Signals jobreaper sends, for metrics, webhooks and audit hooks (Celery's ``Signal`` class)."""

from __future__ import annotations

from celery.utils.dispatch import Signal

#: Sent after each committed batch: ``decisions`` (list of planner decisions), ``source``.
jobs_settled = Signal(name="jobreaper_jobs_settled", providing_args=["decisions", "source"])
#: Sent after every reap run: ``report`` (:class:`celery_jobreaper.report.Report`).
reap_finished = Signal(name="jobreaper_reap_finished", providing_args=["report"])
#: Sent when a settled job's old owner tries to complete it: ``task_id``, ``status``, ``node``.
late_result = Signal(name="jobreaper_late_result", providing_args=["task_id", "status", "node"])
