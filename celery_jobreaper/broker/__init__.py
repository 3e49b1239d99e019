"""Remove exact messages from broker queues (Redis, RabbitMQ, kombu's filesystem transport)."""

from __future__ import annotations

from .messages import task_id_of
from .result import SweepResult

__all__ = ["SweepResult", "task_id_of"]
