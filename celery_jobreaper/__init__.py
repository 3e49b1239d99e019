"""celery_jobreaper: settle jobs left running by dead Celery workers, safely with many workers."""

from __future__ import annotations

from .api import prune, reap
from .errors import (
    ConfigurationError,
    JobReaperError,
    MissingTableError,
    SchemaVersionError,
    StartupReapError,
)
from .report import Report
from .revoked import revoke
from .settings import Settings
from .step import JobReaperStep, install

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "JobReaperError",
    "JobReaperStep",
    "MissingTableError",
    "Report",
    "SchemaVersionError",
    "Settings",
    "StartupReapError",
    "__version__",
    "install",
    "prune",
    "reap",
    "revoke",
]
