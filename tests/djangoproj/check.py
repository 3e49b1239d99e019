"""``python -m djangoproj.check ID…``: each task's state as ``AsyncResult`` reads it through
django-celery-results, printed as JSON (``state``, result ``type``, ``message``, ``info``,
``traceback``, ``date_done``)."""

from __future__ import annotations

import json
import sys
from typing import Any

from celery.result import AsyncResult

from djangoproj.celery import app


def describe(task_id: str) -> dict[str, Any]:
    result = AsyncResult(task_id, app=app)
    value = result.result
    return {
        "state": result.state,
        "type": f"{type(value).__module__}.{type(value).__name__}",
        "message": str(value),
        "info": value if isinstance(value, dict) else None,
        "traceback": result.traceback,
        "date_done": None if result.date_done is None else str(result.date_done),
    }


if __name__ == "__main__":
    print(json.dumps({task_id: describe(task_id) for task_id in sys.argv[1:]}))
