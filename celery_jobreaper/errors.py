"""Exceptions raised by celery_jobreaper, rooted at :class:`JobReaperError`."""

from __future__ import annotations

from celery.exceptions import ImproperlyConfigured


class JobReaperError(Exception):
    """Raised for any failure that celery_jobreaper reports as its own."""


class ConfigurationError(JobReaperError, ImproperlyConfigured):
    """Raised when a ``jobreaper_*`` setting is invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"jobreaper: invalid setting {key}: {problem}")


class SchemaVersionError(JobReaperError):
    """Raised when the database holds jobreaper tables of a newer, unknown schema version."""


class StartupReapError(JobReaperError):
    """Raised in strict mode when the reap at worker start fails; the worker refuses to start."""


class MissingExtraError(JobReaperError, ImportError):
    """Raised when the configured broker needs an optional dependency that is not installed."""


class MissingTableError(JobReaperError):
    """A configured job table does not exist (yet): a migration not run. Not a setting error:
    the worker starts, that source is skipped and looked up again on every reap."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"jobreaper: {key}: {problem}")
