"""jobreaper's own tables, as SQLAlchemy Core ``Table`` objects in a ``MetaData`` users can share.

Alembic users add :data:`metadata` to ``target_metadata`` (or call :func:`define_tables` with
their own ``MetaData``) and set ``jobreaper_create_tables = False``.
"""

from __future__ import annotations

import dataclasses
import logging

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    exc,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from .errors import SchemaVersionError

logger = logging.getLogger(__name__)

#: Version of the table layout below; stored in ``jobreaper_meta``.
SCHEMA_VERSION = 1
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
_KEY = String(191)  # indexable on MySQL/MariaDB utf8mb4
_BIGID = BigInteger().with_variant(Integer(), "sqlite")
#: microseconds on MySQL/MariaDB too (their DATETIME keeps whole seconds by default)
_PRECISE = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


@dataclasses.dataclass(frozen=True)
class JobReaperTables:
    """The tables jobreaper reads and writes."""

    meta: Table
    incarnations: Table
    jobs: Table
    runs: Table
    events: Table
    revoked: Table
    late_writes: Table
    #: the maintenance lease: one row per cluster (see :mod:`celery_jobreaper.lease`)
    lease: Table

    @property
    def all(self) -> tuple[Table, ...]:
        """Every table, in creation order."""
        return (
            self.meta,
            self.incarnations,
            self.jobs,
            self.runs,
            self.events,
            self.revoked,
            self.late_writes,
            self.lease,
        )


def define_tables(target: MetaData, *, prefix: str = "jobreaper_") -> JobReaperTables:
    """Define jobreaper's tables in *target* (its ``schema`` applies) and return them."""
    meta = Table(
        f"{prefix}meta",
        target,
        Column("key", String(64), primary_key=True),
        Column("value", String(255), nullable=False),
    )
    incarnations = Table(
        f"{prefix}incarnations",
        target,
        Column("id", String(32), primary_key=True),
        Column("node", _KEY, nullable=False, index=True),
        Column("host", _KEY, nullable=False),
        Column("pid", Integer, nullable=False),
        Column("started_at", DateTime, nullable=False),
        Column("heartbeat_at", DateTime, nullable=False),
        Column("state", String(16), nullable=False),
        Column("stopped_at", DateTime),
    )
    jobs = Table(
        f"{prefix}jobs",
        target,
        Column("task_id", _KEY, primary_key=True),
        Column("task_name", _KEY, nullable=False),
        Column("status", String(16), nullable=False),
        Column("incarnation_id", String(32)),
        Column("node", _KEY),
        Column("started_at", DateTime),
        Column("completed_at", DateTime),
        Column("error", Text),
        Column("fence", String(32)),
        Column("times_reaped", Integer, nullable=False, default=0),
        Index(f"ix_{prefix}jobs_status_incarnation", "status", "incarnation_id"),
    )
    runs = Table(
        f"{prefix}runs",
        target,
        Column("id", _BIGID, primary_key=True, autoincrement=True),
        Column("node", _KEY),
        Column("incarnation_id", String(32)),
        Column("trigger", String(16), nullable=False),
        Column("dry_run", Boolean, nullable=False, default=False),
        Column("started_at", DateTime, nullable=False),
        Column("finished_at", DateTime),
        Column("duration", Float),  # seconds
        Column("candidates", Integer, nullable=False, default=0),
        Column("settled", Integer, nullable=False, default=0),
        Column("left_alone", Integer, nullable=False, default=0),
        Column("error", Text),
    )
    events = Table(
        f"{prefix}events",
        target,
        Column("id", _BIGID, primary_key=True, autoincrement=True),
        Column("run_id", _BIGID, index=True),
        Column("at", DateTime, nullable=False),
        Column("source", _KEY, nullable=False),
        Column("job_id", _KEY, nullable=False),
        Column("task_id", _KEY),
        Column("kind", _KEY),
        Column("previous_status", String(64)),
        Column("new_status", String(64)),
        Column("action", String(32), nullable=False),
        Column("reason", Text),
        Column("owner", _KEY),
        Index(f"ix_{prefix}events_source_job", "source", "job_id"),
        # the recent settlements a reap checks for late writes (see late_writes.py)
        Index(f"ix_{prefix}events_action_at", "action", "at"),
    )
    revoked = Table(
        f"{prefix}revoked",
        target,
        Column("task_id", _KEY, primary_key=True),
        Column("revoked_at", DateTime, nullable=False),
        Column("expires_at", DateTime, nullable=False, index=True),
        Column("node", _KEY),
    )
    # One row per late write recorded (the settlement's event id is the key): what makes
    # concurrent reapers record each late write once.
    late_writes = Table(
        f"{prefix}late_writes",
        target,
        Column("event_id", _BIGID, primary_key=True, autoincrement=False),
        Column("detected_at", DateTime, nullable=False, index=True),
    )
    # One row per lease name: who leads the cluster's maintenance, until when (the database's
    # clock), and the generation, raised on every change of holder (the fencing token).
    lease = Table(
        f"{prefix}lease",
        target,
        Column("name", String(64), primary_key=True),
        Column("holder", String(32), nullable=False),  # incarnation id
        Column("node", _KEY, nullable=False),
        Column("generation", _BIGID, nullable=False),
        Column("acquired_at", _PRECISE, nullable=False),
        Column("renewed_at", _PRECISE, nullable=False),
        Column("expires_at", _PRECISE, nullable=False),
    )
    return JobReaperTables(meta, incarnations, jobs, runs, events, revoked, late_writes, lease)


#: The default ``MetaData`` holding jobreaper's tables; give it to Alembic.
metadata = MetaData(naming_convention=NAMING_CONVENTION)
#: The default tables, defined in :data:`metadata`.
tables = define_tables(metadata)


def create_all(engine: Engine, tbls: JobReaperTables = tables) -> str | None:
    """Create jobreaper's tables if missing and record the schema version.

    Safe when several workers start at once: a concurrent creator's "already exists" error is
    swallowed once the tables are seen to exist. Returns the schema version stored (read or
    recorded here; give it to :func:`check_stored_version` instead of reading it again), or
    ``None`` when another worker recorded it at the same moment.
    """
    with engine.connect() as conn:  # one catalogue query per schema, not one per table
        existing = {
            (schema, name)
            for schema in {t.schema for t in tbls.all}
            for name in table_names(conn, schema)
        }
        if all((table.schema, table.name) in existing for table in tbls.all):
            # the usual start: nothing to create, the version read on this same connection
            return _stored_version(conn, tbls)
    for table in tbls.all:
        if (table.schema, table.name) in existing:
            continue
        try:
            table.create(engine, checkfirst=True)
        except exc.DBAPIError:
            with engine.connect() as conn:
                if not inspect(conn).has_table(table.name, schema=table.schema):
                    raise
    late = tbls.late_writes
    if (late.schema, late.name) not in existing and (tbls.events.schema, tbls.events.name) in (
        existing
    ):
        # Tables made by an older celery_jobreaper: the events index that came with the late
        # writes table is added with it (once; no catalogue query on later starts).
        _create_indexes(engine, tbls.events)
    with engine.connect() as conn:
        return _stored_version(conn, tbls)


def _stored_version(conn: Connection, tbls: JobReaperTables) -> str | None:
    """The schema version stored, recorded (and committed) by *conn* when there is none yet;
    ``None`` when another worker recorded it at the same moment."""
    try:
        row = conn.execute(
            select(tbls.meta.c.value).where(tbls.meta.c.key == "schema_version")
        ).first()
        if row is not None:
            return str(row[0])
        conn.execute(insert(tbls.meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
        conn.commit()
        return str(SCHEMA_VERSION)
    except exc.IntegrityError:
        return None  # another worker recorded it first


#: PostgreSQL: the names of the tables of a schema, as the inspector's ``get_table_names``
#: selects them (ordinary and partitioned tables, not temporary ones; ``{scope}``: the schema).
_PG_TABLE_NAMES = """
SELECT c.relname::text FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence != 't' AND {scope}
"""
#: without a schema: the tables the search path shows (the inspector's condition)
_PG_VISIBLE = "pg_catalog.pg_table_is_visible(c.oid) AND n.nspname != 'pg_catalog'"


def table_names(conn: Connection, schema: str | None) -> list[str]:
    """The tables of *schema* (``None``: the default one), as ``Inspector.get_table_names``.

    On PostgreSQL one small textual catalogue query: the inspector's is built and compiled
    anew in every worker process, which cost a worker's start a few ms
    (``tests/test_schema_names.py`` compares the two).
    """
    if conn.dialect.name != "postgresql":
        return list(inspect(conn).get_table_names(schema=schema))
    if schema is None:
        query = text(_PG_TABLE_NAMES.format(scope=_PG_VISIBLE))
    else:
        query = text(_PG_TABLE_NAMES.format(scope="n.nspname = :jr_schema")).bindparams(
            jr_schema=schema
        )
    return [str(name) for name in conn.execute(query).scalars()]


def _create_indexes(engine: Engine, table: Table) -> None:
    """Create *table*'s indexes that are missing (a concurrent creator's error swallowed)."""
    with engine.connect() as conn:
        have = {i["name"] for i in inspect(conn).get_indexes(table.name, schema=table.schema)}
    for index in table.indexes:
        if index.name in have:
            continue
        try:
            index.create(engine)
        except exc.DBAPIError:
            with engine.connect() as conn:
                names = {
                    i["name"] for i in inspect(conn).get_indexes(table.name, schema=table.schema)
                }
            if index.name not in names:
                raise


def check_version(conn: Connection, tbls: JobReaperTables = tables) -> None:
    """Raise :class:`SchemaVersionError` unless the stored schema version is one we understand."""
    try:
        row = conn.execute(
            select(tbls.meta.c.value).where(tbls.meta.c.key == "schema_version")
        ).first()
    except exc.DBAPIError as error:
        raise SchemaVersionError(
            f"jobreaper: cannot read {tbls.meta.name}; create the tables "
            "(jobreaper_create_tables = True, or celery_jobreaper.schema.create_all)"
        ) from error
    if row is None:
        raise SchemaVersionError(f"jobreaper: {tbls.meta.name} holds no schema_version")
    check_stored_version(str(row[0]))


def check_stored_version(value: str) -> None:
    """Raise :class:`SchemaVersionError` if the stored version *value* is newer than ours."""
    stored = int(value)
    if stored > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"jobreaper: database schema version {stored} is newer than this "
            f"celery_jobreaper's ({SCHEMA_VERSION}); upgrade celery_jobreaper"
        )
