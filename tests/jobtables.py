"""Seed-shaped job tables for tests (the ``system_jobs`` table of the seed application)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, insert
from sqlalchemy.engine import Engine

from celery_jobreaper.clock import utcnow

SEED_SOURCE: dict[str, Any] = {
    "table": "system_jobs",
    "id": "job_id",
    "status": "status",
    "kind": "job_type",
    "started_at": "started_at",
    "completed_at": "completed_at",
    "error": "error",
}


def seed_table(
    metadata: MetaData, *, owner: bool = False, task_id: bool = False, int_ids: bool = False
) -> Table:
    """The seed's table, optionally with owner and task-id columns."""
    cols: list[Column[Any]] = [
        Column("job_id", Integer if int_ids else String(64), primary_key=True, autoincrement=False),
        Column("job_type", String(64)),
        Column("status", String(16), nullable=False),
        Column("started_at", DateTime),
        Column("completed_at", DateTime),
        Column("error", Text),
    ]
    if owner:
        cols.append(Column("owner", String(191)))
    if task_id:
        cols.append(Column("task_id", String(191)))
    return Table("system_jobs", metadata, *cols)


def create_seed(engine: Engine, rows: list[dict[str, Any]], **kw: Any) -> Table:
    """Create the table and insert *rows* (defaults: running since one day ago)."""
    table = seed_table(MetaData(), **kw)
    table.create(engine)
    now = utcnow()
    full = [
        {
            "job_type": "library_scan",
            "status": "running",
            "started_at": now - timedelta(days=1),
            "completed_at": None,
            "error": None,
            **row,
        }
        for row in rows
    ]
    if full:
        with engine.begin() as conn:
            conn.execute(insert(table), full)
    return table


def ago(**delta: float) -> datetime:
    """A naive-UTC time in the past."""
    return utcnow() - timedelta(**delta)
