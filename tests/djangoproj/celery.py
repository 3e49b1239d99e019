"""The project's Celery app, as Django projects write it (``config_from_object`` with the
``CELERY`` namespace), with jobreaper installed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import django
from celery import Celery

import celery_jobreaper

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproj.settings")
django.setup()

app = Celery("djangoproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
celery_jobreaper.install(app)


@app.task(name="jr.sleep", bind=True)
def sleep(self: Any, seconds: float, tag: str = "") -> str:
    """Sleep, announcing the start through a file in JR_SIGNAL_DIR."""
    folder = os.environ.get("JR_SIGNAL_DIR")
    if folder:
        Path(folder, f"started-{tag or self.request.id}").write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return tag
