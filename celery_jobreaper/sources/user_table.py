"""A user's own job table (the seed's ``system_jobs`` shape), through a column mapping."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kombu.utils.imports import symbol_by_name
from sqlalchemy import (
    Column,
    ColumnElement,
    DateTime,
    Enum,
    MetaData,
    Table,
    exc,
    func,
    inspect,
    null,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.types import Date

from ..clock import as_naive_utc
from ..errors import ConfigurationError, MissingTableError
from ..settings import SourceSpec
from ..timezones import localize
from .base import Candidate, SettleTarget, keyset_batch


def resolve_table(spec: SourceSpec, conn: Connection) -> Table:
    """Turn ``table`` (name, ``Table``, declarative model or ``"pkg.mod:attr"``) into a ``Table``.

    Names are reflected from the database, so configuration never reaches SQL as text. The id
    column must be a primary key or unique in the database (see :func:`check_unique_id`).
    """
    key = f"{spec.key}.table"
    table: Any = spec.table
    if isinstance(table, str) and ":" in table:
        try:
            table = symbol_by_name(table)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigurationError(key, f"cannot import {spec.table!r}: {error}") from error
    table = getattr(table, "__table__", table)
    if isinstance(table, Table):
        check_unique_id(spec, table, conn)
        return table
    if not isinstance(table, str):
        raise ConfigurationError(key, f"expected a table name, Table or model, got {table!r}")
    # Only names, types and the primary key are read (not indexes, constraints, comments,
    # unless the id is not the primary key): a worker start pays for every reflection query.
    inspector = inspect(conn)
    keys: list[str] = []
    try:
        columns: list[Any] | None = _pg_plain_columns(conn, table, spec.schema)
        if columns is None:
            columns = list(inspector.get_columns(table, schema=spec.schema))
        unique = _pg_unique_keys(conn, table, spec.schema)
        if unique is None:
            primary = inspector.get_pk_constraint(table, schema=spec.schema)
            keys = list(primary.get("constrained_columns") or ())
        else:
            keys = unique.primary
    except exc.NoSuchTableError:
        columns = []
    if not columns:
        raise _no_table(spec, table, conn)
    reflected = Table(
        table,
        MetaData(),
        *(Column(c["name"], c["type"], primary_key=c["name"] in keys) for c in columns),
        schema=spec.schema,
    )
    check_unique_id(spec, reflected, conn, primary_key=keys, unique=unique)
    return reflected


#: PostgreSQL: each column's name, ``format_type`` and whether its collation is its type's.
_PG_COLUMNS = """
SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
    a.attcollation = t.typcollation
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
WHERE a.attrelid = to_regclass({name})::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
#: ``format_type`` names read without SQLAlchemy's inspector (``-``: no arguments allowed).
_PG_PLAIN = {
    "smallint": "-",
    "integer": "-",
    "bigint": "-",
    "text": "-",
    "date": "-",
    "uuid": "-",
    "boolean": "-",
    "character varying": "length",
    "character": "length",
    "timestamp without time zone": "precision",
    "timestamp with time zone": "precision",
}
_PG_FORMAT = re.compile(r"^(?P<head>[a-z ]+?)(?:\((?P<arg>[0-9]+)\))?(?P<tail>[a-z ]*)$")


def _pg_plain_columns(
    conn: Connection, name: str, schema: str | None
) -> list[dict[str, Any]] | None:
    """On PostgreSQL, the columns of a table of plain types, in one small query; ``None``
    elsewhere or when any column is of another type (or collation) than the ones of
    :data:`_PG_PLAIN`: the inspector reflects such a table.

    The inspector's column query is large: compiling it costs a worker's first start several
    ms. The types built here are the ones it builds (the dialect's ``ischema_names`` classes
    with the same arguments; ``tests/test_reflection.py`` compares them).
    """
    if conn.dialect.name != "postgresql":
        return None
    sql, params = _pg_regclass(_PG_COLUMNS, name, schema)
    rows = conn.execute(text(sql), params).all()
    if not rows:
        return None  # no such table (or no column): the inspector says which
    dialect: Any = conn.dialect
    names = dialect.ischema_names
    columns: list[dict[str, Any]] = []
    for column, formatted, default_collation in rows:
        match = _PG_FORMAT.match(formatted or "")
        if match is None or not default_collation:
            return None
        attype = (match["head"] + match["tail"]).strip()
        role = _PG_PLAIN.get(attype)
        if role is None or (role == "-" and match["arg"]):
            return None
        kwargs: dict[str, Any] = {}
        if attype.startswith("timestamp"):
            kwargs["timezone"] = attype.endswith("with time zone")
        args: tuple[int, ...] = ()
        if match["arg"]:
            if role == "precision":
                kwargs["precision"] = int(match["arg"])
            else:
                args = (int(match["arg"]),)
        columns.append({"name": column, "type": names[attype](*args, **kwargs)})
    return columns


def _pg_regclass(template: str, name: str, schema: str | None) -> tuple[str, dict[str, str]]:
    """*template* with ``{name}`` resolving the table (a bound name, quoted by the server)."""
    if schema is None:
        return template.format(name="quote_ident(:jr_name)"), {"jr_name": name}
    qualified = "quote_ident(:jr_schema) || '.' || quote_ident(:jr_name)"
    return template.format(name=qualified), {"jr_name": name, "jr_schema": schema}


@dataclasses.dataclass(frozen=True, slots=True)
class _UniqueKeys:
    """The key columns of a table's primary key and of each of its unique indexes."""

    primary: list[str]
    unique: list[list[str]]  #: plain-column, non-partial unique indexes (constraints have one)


#: PostgreSQL: every unique index (primary key and unique constraints have one) without WHERE
#: and without expressions, with its key columns (not INCLUDE ones), in one catalogue query;
#: the table name is a bound parameter, resolved by ``to_regclass`` like the search path does.
_PG_UNIQUE_KEYS = """
SELECT c.oid IS NOT NULL AS found, i.indisprimary, (
    SELECT array_agg(a.attname::text ORDER BY k.ord)
    FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE k.ord <= i.indnkeyatts
) AS cols
FROM (SELECT to_regclass({name})::oid AS oid) AS c
LEFT JOIN pg_catalog.pg_index i
    ON i.indrelid = c.oid AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
"""


def _pg_unique_keys(conn: Connection, name: str, schema: str | None) -> _UniqueKeys | None:
    """On PostgreSQL, the table's unique keys in one query (``None`` elsewhere).

    What :func:`check_unique_id` asks through the inspector (primary key, unique constraints,
    indexes: several catalogue queries, each compiled on a worker's first start) comes from
    ``pg_index`` directly. Raises ``NoSuchTableError`` for a table that does not exist.
    """
    if conn.dialect.name != "postgresql":
        return None
    sql, params = _pg_regclass(_PG_UNIQUE_KEYS, name, schema)
    rows = conn.execute(text(sql), params).all()
    if not rows or not rows[0][0]:
        raise exc.NoSuchTableError(name)
    primary: list[str] = []
    unique: list[list[str]] = []
    for _, is_primary, cols in rows:
        if cols is None:
            continue  # the LEFT JOIN's row of a table without unique index
        if is_primary:
            primary = list(cols)
        unique.append(list(cols))
    return _UniqueKeys(primary, unique)


def _no_table(spec: SourceSpec, name: str, conn: Connection) -> MissingTableError:
    where = f" in schema {spec.schema!r}" if spec.schema else ""
    close = close_table_names(conn, name, spec.schema)
    hint = (
        f"; did you mean {' or '.join(repr(n) for n in close)}?"
        if close
        else "; no table of a similar name exists"
    )
    return MissingTableError(
        f"{spec.key}.table",
        f"no table named {name!r}{where} in the database (a migration not run yet?){hint}",
    )


def close_table_names(conn: Connection, name: str, schema: str | None) -> list[str]:
    """Up to three existing table names close to *name* (a typo's likely intent), best first.

    Case is ignored when comparing. Empty when the names cannot be read.
    """
    try:
        names = inspect(conn).get_table_names(schema=schema)
    except exc.DBAPIError:
        return []
    import difflib  # (only when a configured table is missing)

    by_lower = {n.lower(): n for n in names if n != name}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    return [by_lower[n] for n in close]


def check_unique_id(
    spec: SourceSpec,
    table: Table,
    conn: Connection,
    *,
    primary_key: list[str] | None = None,
    unique: _UniqueKeys | None = None,
) -> None:
    """Refuse an id column that the database does not keep unique.

    A decision is applied by id: with two rows under one id, settling one job (judged for its
    dead owner) would fail the other (perhaps a live owner's) too. The database is asked, not
    the ``Table`` a model declares: a primary key of that one column, or a unique constraint or
    unique index (without ``WHERE``) on exactly that column.
    """
    id_name = spec.columns.get("id")
    if id_name is None or id_name not in table.c:
        return  # UserTableSource names the missing column
    name = table.c[id_name].name
    try:
        if unique is None:
            unique = _pg_unique_keys(conn, table.name, table.schema)
        if unique is not None:
            if [name] in unique.unique:
                return
            raise _not_unique(spec, table, name)
    except exc.NoSuchTableError:
        raise _no_table(spec, table.name, conn) from None
    inspector = inspect(conn)
    try:
        if primary_key is None:
            pk = inspector.get_pk_constraint(table.name, schema=table.schema)
            primary_key = list(pk.get("constrained_columns") or ())
        if primary_key == [name]:
            return
        for constraint in inspector.get_unique_constraints(table.name, schema=table.schema):
            if list(constraint.get("column_names") or ()) == [name]:
                return
        for index in inspector.get_indexes(table.name, schema=table.schema):
            partial = any(
                k.endswith("_where") and v is not None
                for k, v in (index.get("dialect_options") or {}).items()
            )
            if index.get("unique") and not partial and list(index["column_names"]) == [name]:
                return
    except exc.NoSuchTableError:
        raise _no_table(spec, table.name, conn) from None
    raise _not_unique(spec, table, name)


def _not_unique(spec: SourceSpec, table: Table, name: str) -> ConfigurationError:
    return ConfigurationError(
        f"{spec.key}.id",
        f"column {name!r} of table {table.name!r} is neither its primary key nor unique: "
        "rows sharing an id would be settled together, including rows never judged; "
        "map a primary key or unique column (or add a unique index on it)",
    )


class UserTableSource:
    """Rows of a user table whose status is one of ``stale_statuses``."""

    #: a late write's meaning (:mod:`celery_jobreaper.late_writes`)
    late_write_note = (
        "the application's own write to a user table is applied; fence it with "
        "WHERE status = 'running'"
    )

    def is_late_write(self, status: str, values: Mapping[str, Any], owner: str | None) -> bool:
        """Any status but the one jobreaper set is a late write (the application's own)."""
        return True

    @property
    def compared(self) -> dict[str, Column[Any]]:
        """Columns read by late-write checks besides id and status: owner and task id."""
        return {role: self.cols[role] for role in ("owner", "task_id") if role in self.cols}

    def is_new_run(self, status: str, values: Mapping[str, Any], owner: str | None) -> bool:
        """Never told apart: any other status is the application's own (late) write."""
        return False

    def is_written_over(self, values: Mapping[str, Any], settled_reason: str) -> bool:
        """A row still holding the status jobreaper set is taken as unchanged (a user table
        has no column telling jobreaper's write from the application's)."""
        return False

    def __init__(self, spec: SourceSpec, table: Table) -> None:
        self.spec = spec
        self.name = spec.name
        self.table = table
        self.cols: dict[str, Column[Any]] = {}
        for role, column in spec.columns.items():
            if column is None:
                continue
            if column not in table.c:
                raise ConfigurationError(
                    f"{spec.key}.{role}",
                    f"table {table.name!r} has no column {column!r} "
                    f"(it has: {', '.join(c.name for c in table.c)})",
                )
            self.cols[role] = table.c[column]
        self._check_types()
        self.has_owner = "owner" in self.cols
        self.has_task_id = "task_id" in self.cols
        # The compare-and-set re-checks these: the owner judged, and the start and the task the
        # row had when read (a job that finished and started again in between, or a row reused
        # by a new run of its task, is a new run, not judged).
        guards: dict[str, ColumnElement[Any]] = {
            role: self.cols[role]
            for role in ("owner", "started_at", "task_id")
            if role in self.cols
        }
        self.target = SettleTarget(
            table=table,
            id=self.cols["id"],
            status=self.cols["status"],
            stale_statuses=spec.stale_statuses,
            failed_status=spec.failed_status,
            completed_at=self.cols.get("completed_at"),
            error=self.cols.get("error"),
            guards=guards,
            zone=spec.zone,
        )

    def _check_types(self) -> None:
        status_type = self.cols["status"].type
        if isinstance(status_type, Enum) and status_type.enums:
            allowed = set(status_type.enums)
            for value in (*self.spec.stale_statuses, self.spec.failed_status):
                if value not in allowed:
                    raise ConfigurationError(
                        f"{self.spec.key}.stale_statuses"
                        if value in self.spec.stale_statuses
                        else f"{self.spec.key}.failed_status",
                        f"{value!r} is not a value of column {self.cols['status'].name!r} "
                        f"(allowed: {sorted(allowed)})",
                    )
        for role in ("started_at", "completed_at"):
            col = self.cols.get(role)
            if col is not None and not isinstance(col.type, (DateTime, Date)):
                raise ConfigurationError(
                    f"{self.spec.key}.{role}",
                    f"column {col.name!r} is {col.type}, expected a date/time column",
                )

    def owners(self, conn: Connection) -> tuple[set[str], set[str]]:
        """Node names owning stale-status rows (when the table has an owner column)."""
        if not self.has_owner:
            return set(), set()
        owner = self.cols["owner"]
        rows = conn.execute(select(owner).where(self._stale()).distinct())
        return set(), {r[0] for r in rows if r[0]}

    def has_ownerless_stale(self, conn: Connection) -> bool:
        """Whether a stale-status row has no owner (no owner column, or a NULL in it)."""
        probe = select(self.cols["id"]).where(self._stale())
        if self.has_owner:
            probe = probe.where(self.cols["owner"].is_(None))
        return conn.execute(probe.limit(1)).first() is not None

    def stale_summary(self, conn: Connection) -> tuple[int, datetime | None]:
        """How many rows are in a stale status, and the oldest start among them (naive UTC)."""
        started = self.cols.get("started_at")
        oldest_col = func.min(started) if started is not None else null()
        count, oldest = conn.execute(select(func.count(), oldest_col).where(self._stale())).one()
        if oldest is None:
            return int(count), None
        if not isinstance(oldest, datetime):  # a DATE column
            oldest = datetime(oldest.year, oldest.month, oldest.day)
        return int(count), as_naive_utc(localize(oldest, self.spec.zone))

    def _stale(self) -> Any:
        return self.cols["status"].in_(self.spec.stale_statuses)

    def batch(self, conn: Connection, after: Any, limit: int) -> list[Candidate]:
        """Stale-status rows, in primary-key order."""
        roles = [
            r for r in ("id", "status", "kind", "started_at", "owner", "task_id") if r in self.cols
        ]
        cols = [self.cols[r].label(r) for r in roles]
        rows = keyset_batch(
            conn,
            id_col=self.cols["id"],
            columns=cols,
            where=self._stale(),
            after=after,
            limit=limit,
        )
        # Positions instead of row._mapping lookups: this loop runs once per stale row.
        at = {role: i for i, role in enumerate(roles)}
        i_id, i_status = at["id"], at["status"]
        i_kind, i_started = at.get("kind"), at.get("started_at")
        i_owner, i_task = at.get("owner"), at.get("task_id")
        zone = self.spec.zone
        out = []
        for row in rows:
            kind = None if i_kind is None else row[i_kind]
            task_id = None if i_task is None else row[i_task]
            out.append(
                Candidate(
                    self.name,
                    row[i_id],
                    row[i_status],
                    None if kind is None else str(kind),
                    None if i_started is None else localize(row[i_started], zone),
                    None if i_owner is None else row[i_owner],
                    None,
                    None if task_id is None else str(task_id),
                )
            )
        return out
