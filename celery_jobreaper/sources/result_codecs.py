"""How each supported result backend encodes a row: Celery's SQLAlchemy ``DatabaseBackend``
and django-celery-results' ``DatabaseBackend``, each through the backend's own methods."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from kombu.utils.encoding import ensure_bytes
from sqlalchemy import DateTime, Table


def traceback_text(exc: BaseException) -> str:
    """The traceback text stored with the exception (it was not raised: its last line)."""
    return "".join(traceback.format_exception_only(type(exc), exc))


def _as_column(table: Table, column: str, now: datetime) -> datetime:
    """*now* (naive UTC) as the column stores it: aware for a time-zone-aware column."""
    type_ = table.c[column].type
    if isinstance(type_, DateTime) and type_.timezone:
        return now.replace(tzinfo=timezone.utc)
    return now


class SQLAlchemyResultCodec:
    """Celery's ``celery.backends.database`` (``celery_taskmeta``): ``result`` holds the
    backend's encoding as bytes; no start time is stored."""

    decode_columns: Sequence[str] = ()
    started_column: str | None = None

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        #: the table as the backend configured it (``database_table_names`` / ``_schemas``)
        self.table: Table = backend.task_cls.__table__

    def hostname(self, result: Any, extra: Sequence[Any]) -> str | None:
        """The hostname in the stored ``{"pid", "hostname"}``, decoded by the backend."""
        meta = self.decode(result, extra)
        return meta.get("hostname") if isinstance(meta, dict) else None

    def decode(self, result: Any, extra: Sequence[Any]) -> Any:
        """The stored result as the backend decodes it (may raise if unreadable)."""
        return self.backend.decode(ensure_bytes(result))

    def failure_values(self, exc: BaseException, now: datetime) -> dict[str, Any]:
        """``result`` as ``DatabaseBackend._update_result`` encodes an exception."""
        encoded = ensure_bytes(self.backend.encode(self.backend.prepare_exception(exc)))
        return {
            "result": encoded,
            "traceback": traceback_text(exc),
            "date_done": _as_column(self.table, "date_done", now),
        }


class _Encoded:
    """What ``decode_content`` reads of a row besides the content."""

    def __init__(self, content_encoding: Any) -> None:
        self.content_encoding = content_encoding


class DjangoResultCodec:
    """django-celery-results (``TaskResult``): ``result`` is text, with ``content_type`` and
    ``content_encoding`` beside it; ``date_started`` (2.6+) is the start time."""

    decode_columns: Sequence[str] = ("content_encoding",)

    def __init__(self, backend: Any, table: Table) -> None:
        self.backend = backend
        self.table = table
        self.started_column: str | None = "date_started" if "date_started" in table.c else None

    def hostname(self, result: Any, extra: Sequence[Any]) -> str | None:
        """The hostname in the stored result, read by ``decode_content``."""
        meta = self.decode(result, extra)
        return meta.get("hostname") if isinstance(meta, dict) else None

    def decode(self, result: Any, extra: Sequence[Any]) -> Any:
        """The stored result as ``decode_content`` reads it (may raise if unreadable)."""
        return self.backend.decode_content(_Encoded(extra[0]), result)

    def failure_values(self, exc: BaseException, now: datetime) -> dict[str, Any]:
        """The content columns as ``DatabaseBackend._store_result`` writes an exception."""
        content_type, content_encoding, result = self.backend.encode_content(
            self.backend.prepare_exception(exc)
        )
        return {
            "result": result,
            "content_type": content_type,
            "content_encoding": content_encoding,
            "traceback": traceback_text(exc),
            "date_done": _as_column(self.table, "date_done", now),
        }
