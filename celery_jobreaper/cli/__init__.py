"""``celery -A proj jobreaper plan | reap | status | history | prune``.

Exit codes (the same for every command): see :mod:`celery_jobreaper.cli.group`.
"""

from __future__ import annotations

from . import history, prune, run, status
from .group import EXIT_DECLINED, EXIT_FAILED, EXIT_NO_REPORT, EXIT_OK, EXIT_USAGE, jobreaper

__all__ = [
    "EXIT_DECLINED",
    "EXIT_FAILED",
    "EXIT_NO_REPORT",
    "EXIT_OK",
    "EXIT_USAGE",
    "history",
    "jobreaper",
    "prune",
    "run",
    "status",
]
