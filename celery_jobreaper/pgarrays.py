"""PostgreSQL array parameters (binary with psycopg 3) and ``INSERT … SELECT FROM unnest``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, Table, bindparam, func, insert, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import TypeDecorator


class _BinaryList(list[Any]):
    """A list psycopg 3 sends as a binary array (see :func:`send_arrays_in_binary`)."""


class Array(TypeDecorator[list[Any]]):
    """A PostgreSQL array parameter; with psycopg 3 it travels in binary.

    In text format psycopg escapes every element with a regular expression, which costs more
    than everything else about a batch's parameters.
    """

    impl = ARRAY
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """Mark the list for psycopg's binary dumper (other drivers: as ``ARRAY`` does)."""
        if dialect.driver == "psycopg":
            return _BinaryList
        return super().bind_processor(dialect)


def send_arrays_in_binary(conn: Connection) -> None:
    """Let psycopg 3 dump this connection's :class:`_BinaryList` parameters in binary."""
    if conn.dialect.driver != "psycopg":
        return
    from psycopg.types.array import ListBinaryDumper

    adapters = getattr(conn.connection.dbapi_connection, "adapters", None)
    if adapters is not None:
        adapters.register_dumper(_BinaryList, ListBinaryDumper)


def insert_unnest(
    conn: Connection, table: Table, fixed: dict[str, Any], per_row: dict[str, list[Any]]
) -> None:
    """``INSERT INTO table (…) SELECT … FROM unnest(:a, :b, …)``: one statement, any row count.

    Columns whose value is the same on every row are bound once instead of as an array (all
    but the first of *per_row*, which always goes as an array and so gives the row count).
    """
    arrays: dict[str, list[Any]] = {}
    for name, values in per_row.items():
        if arrays and values.count(values[0]) == len(values):
            fixed = {**fixed, name: values[0]}
        else:
            arrays[name] = values
    send_arrays_in_binary(conn)
    v = (
        func.unnest(
            *(
                bindparam(f"jr_{name}", values, type_=Array(table.c[name].type))
                for name, values in arrays.items()
            )
        )
        .table_valued(*arrays)
        .render_derived(name="jr_v")
    )
    names = [*fixed, *arrays]
    exprs: list[ColumnElement[Any]] = [
        bindparam(f"jr_{name}", value, type_=table.c[name].type) for name, value in fixed.items()
    ]
    exprs += [v.c[name] for name in arrays]
    conn.execute(insert(table).from_select(names, select(*exprs).select_from(v)))
