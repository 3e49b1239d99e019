"""Where stale jobs come from: jobreaper's tracked-jobs table and users' own job tables."""

from __future__ import annotations

from .base import Candidate, JobSource, SettleTarget
from .tracked import TrackedJobsSource
from .user_table import UserTableSource, resolve_table

__all__ = [
    "Candidate",
    "JobSource",
    "SettleTarget",
    "TrackedJobsSource",
    "UserTableSource",
    "resolve_table",
]
