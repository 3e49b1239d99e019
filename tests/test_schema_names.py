"""PostgreSQL: the tables jobreaper's own tables are looked for among (``create_all`` at a
worker's start) are listed with one small textual catalogue query instead of SQLAlchemy's
inspector. The names must be exactly the inspector's, for the default schema and a named one."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from celery_jobreaper.schema import table_names

SETUP = [
    "CREATE TABLE plain (a int)",
    'CREATE TABLE "Mixed Case" (a int)',
    "CREATE TABLE parted (a int) PARTITION BY RANGE (a)",
    "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10)",
    "CREATE UNLOGGED TABLE unlogged (a int)",
    "CREATE VIEW a_view AS SELECT 1 AS a",
    "CREATE MATERIALIZED VIEW a_matview AS SELECT 1 AS a",
    "CREATE SEQUENCE a_sequence",
    "CREATE SCHEMA other",
    "CREATE TABLE other.elsewhere (a int)",
    "CREATE TABLE other.plain (a int)",
    "CREATE VIEW other.other_view AS SELECT 1 AS a",
    "CREATE SCHEMA empty",
]


def test_table_names_match_the_inspector(pg_url: str, engine_for: Callable[[str], Engine]) -> None:
    engine = engine_for(pg_url)
    with engine.begin() as conn:
        for statement in SETUP:
            conn.execute(text(statement))
    with engine.connect() as conn:
        conn.execute(text("CREATE TEMPORARY TABLE temporary_one (a int)"))
        for schema in (None, "public", "other", "empty", "pg_catalog", "no_such_schema"):
            fast = table_names(conn, schema)
            slow = inspect(conn).get_table_names(schema=schema)
            assert sorted(fast) == sorted(slow), schema
        assert "temporary_one" not in table_names(conn, None)
        assert {"plain", "Mixed Case", "parted", "parted_1", "unlogged"} <= set(
            table_names(conn, None)
        )


def test_table_names_follow_the_search_path(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    """Without a schema: the tables the search path shows, as the inspector lists them."""
    engine = engine_for(pg_url)
    with engine.begin() as conn:
        for statement in SETUP:
            conn.execute(text(statement))
    with engine.connect() as conn:
        conn.execute(text("SET search_path TO other, public"))
        fast = table_names(conn, None)
        slow = inspect(conn).get_table_names()
        assert sorted(fast) == sorted(slow)
        assert "elsewhere" in fast


def test_table_names_elsewhere_are_the_inspectors(db_url: str) -> None:
    """MariaDB and SQLite keep the inspector."""
    from sqlalchemy import create_engine

    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE plain (a int)"))
        with engine.connect() as conn:
            assert sorted(table_names(conn, None)) == sorted(inspect(conn).get_table_names())
            assert "plain" in table_names(conn, None)
    finally:
        engine.dispose()
