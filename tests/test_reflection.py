"""PostgreSQL: a user table of plain column types is read with one small catalogue query
instead of SQLAlchemy's inspector (a worker's start compiles fewer statements). The types must
be exactly the inspector's; any other type makes the inspector reflect the table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from celery_jobreaper.sources.user_table import _pg_plain_columns

PLAIN = """
CREATE TABLE plain (
    a smallint, b integer, c bigint, d text, e varchar(64), f varchar, g char(3), h character,
    i timestamp, j timestamp(3), k timestamptz, l timestamp(0) with time zone, m date, n uuid,
    o boolean, p serial PRIMARY KEY, "Mixed Case" varchar(191), q bigserial
)
"""


def test_plain_types_match_the_inspector(pg_url: str, engine_for: Callable[[str], Engine]) -> None:
    engine = engine_for(pg_url)
    with engine.begin() as conn:
        conn.execute(text(PLAIN))
        conn.execute(text("ALTER TABLE plain DROP COLUMN b"))  # dropped columns are skipped
    with engine.connect() as conn:
        fast = _pg_plain_columns(conn, "plain", None)
        slow = inspect(conn).get_columns("plain")
    assert fast is not None
    assert [(c["name"], repr(c["type"])) for c in fast] == [
        (c["name"], repr(c["type"])) for c in slow
    ]


@pytest.mark.parametrize(
    "column",
    [
        "x numeric(10, 2)",
        'x varchar(10) COLLATE "C"',
        "x text[]",
        "x jsonb",
        "x mood",
        "x time",
        "x interval",
    ],
)
def test_other_types_are_left_to_the_inspector(
    column: str, pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TYPE mood AS ENUM ('sad', 'ok')"))
        conn.execute(text(f"CREATE TABLE other (id integer PRIMARY KEY, {column})"))
    with engine.connect() as conn:
        assert _pg_plain_columns(conn, "other", None) is None


def test_a_missing_table_or_an_index_is_not_read(
    pg_url: str, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id integer PRIMARY KEY)"))
    with engine.connect() as conn:
        assert _pg_plain_columns(conn, "missing", None) is None
        assert _pg_plain_columns(conn, "t_pkey", None) is None
        in_schema = _pg_plain_columns(conn, "t", "public")
        assert in_schema is not None
        assert [(c["name"], repr(c["type"])) for c in in_schema] == [("id", "INTEGER()")]
