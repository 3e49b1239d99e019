"""The SQLAlchemy engine jobreaper uses: created from settings (and then owned) or borrowed."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

from kombu.utils.imports import symbol_by_name
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from . import native
from .errors import ConfigurationError
from .extras import driver_hint
from .settings import Settings

logger = logging.getLogger(__name__)


class Database:
    """An engine plus what jobreaper needs to know about it (ownership, dialect abilities).

    Under gevent's monkey-patching each real thread other than the one that made this object
    (jobreaper's loops: see :mod:`celery_jobreaper.native`) gets a copy of the engine with a
    pool of its own: a pooled connection's socket waits on the hub of the thread that opened
    it and cannot be used from another thread.
    """

    def __init__(self, engine: Engine, *, owned: bool) -> None:
        if not owned and engine.dialect.name == "sqlite":
            # jobreaper's own engines get this in make_engine; a borrowed one through a view
            engine = borrowed_sqlite_begin_immediate(engine)
        self._engine = engine
        self.owned = owned
        self._pid = os.getpid()
        self._home = native.thread_ident()
        self._local = native.thread_local()  # this thread's engine copy (gevent only)
        self._copies: list[Engine] = []  # every copy made, to dispose
        self._copies_lock = native.real_lock()
        name = engine.dialect.name
        #: ``SELECT … FOR UPDATE SKIP LOCKED`` is available (PostgreSQL, MySQL 8, MariaDB 10.6+).
        self.skip_locked = name in {"postgresql", "mysql", "mariadb"}
        #: ``UPDATE … RETURNING`` is available.
        self.update_returning = bool(engine.dialect.update_returning)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """Create (or resolve) the engine of ``jobreaper_engine`` or ``jobreaper_database_url``."""
        if settings.engine is not None:
            engine = settings.engine
            if isinstance(engine, str):
                try:
                    engine = symbol_by_name(engine)
                except (ImportError, AttributeError, ValueError) as error:
                    raise ConfigurationError(
                        "jobreaper_engine", f"cannot import {engine!r}: {error}"
                    ) from error
                if callable(engine) and not isinstance(engine, Engine):
                    engine = engine()
            if not isinstance(engine, Engine):
                raise ConfigurationError("jobreaper_engine", f"not an Engine: {engine!r}")
            return cls(engine, owned=False)
        assert settings.database_url is not None
        try:
            engine = make_engine(settings.database_url, settings)
        except (ArgumentError, NoSuchModuleError, ImportError) as error:
            hint = ""
            if isinstance(error, ImportError):
                hint = driver_hint(error, settings.database_url)
            raise ConfigurationError(
                "jobreaper_database_url",
                f"cannot use {maybe_sanitize_url(settings.database_url)!r}: {error}{hint}",
            ) from error
        return cls(engine, owned=True)

    @property
    def engine(self) -> Engine:
        """The engine for the calling thread (the one given, but see the class docstring)."""
        if not native.patched() or native.thread_ident() == self._home:
            return self._engine
        engine: Engine | None = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._local.engine = _with_own_pool(self._engine)
            with self._copies_lock:
                self._copies.append(engine)
        return engine

    @property
    def url(self) -> str:
        """The database URL with any password hidden, for logs."""
        return str(maybe_sanitize_url(self._engine.url.render_as_string(hide_password=False)))

    def connect(self) -> Connection:
        """A connection; after a fork, the pool inherited from the parent is dropped first."""
        if self._pid != os.getpid():
            self.after_fork()
        return self.engine.connect()

    def connect_fresh_reads(self) -> Connection:
        """A connection whose transactions read what was committed before each statement.

        MySQL/MariaDB default to REPEATABLE READ, where a transaction's plain SELECTs all read
        the snapshot of its first one: the reaper's checks made again once a batch's rows are
        locked (who registered, whose owner heartbeated) would not see what was committed
        meanwhile. READ COMMITTED there, as PostgreSQL's default; SQLite serialises writers.
        """
        conn = self.connect()
        if conn.dialect.name in ("mysql", "mariadb"):
            conn.execution_options(isolation_level="READ COMMITTED")
        return conn

    def _take_copies(self) -> list[Engine]:
        with self._copies_lock:
            copies, self._copies = self._copies, []
        self._local = native.thread_local()
        return copies

    def after_fork(self) -> None:
        """Forget pooled connections inherited from the parent process (never close them)."""
        self._pid = os.getpid()
        self._engine.dispose(close=False)
        self._take_copies()

    def dispose(self) -> None:
        """Close pooled connections if jobreaper created the engine; borrowed ones stay open
        (the pools of the per-thread copies are jobreaper's own: closed either way)."""
        for engine in self._take_copies():
            engine.pool.dispose()
        if self.owned:
            self._engine.dispose()


def _with_own_pool(engine: Engine) -> Engine:
    """A copy of *engine* (dialect, options, event listeners shared) with a pool of its own."""
    if isinstance(engine, OptionEngine):  # its pool is its parent's: copy the parent
        option_clone = copy.copy(engine)
        option_clone._proxied = _with_own_pool(engine._proxied)
        return option_clone
    clone = copy.copy(engine)
    clone.pool = engine.pool.recreate()
    return clone


def make_engine(url: str, settings: Settings) -> Engine:
    """Create an engine with a bounded connect time; SQLite gets write-locking transactions."""
    options: dict[str, Any] = dict(settings.engine_options)
    connect_args: dict[str, Any] = dict(options.pop("connect_args", {}))
    timeout = max(1, round(settings.connect_timeout))
    if url.startswith(("postgresql", "postgres")) or url.startswith(("mysql", "mariadb")):
        connect_args.setdefault("connect_timeout", timeout)
    elif url.startswith("sqlite"):
        connect_args.setdefault("timeout", max(settings.connect_timeout, 30.0))
        options.pop("pool_recycle", None)
    if _psycopg(url):
        # No column jobreaper reads or writes is an hstore: without this the first connection
        # of every worker also looks the hstore type up in the catalogue (a round trip).
        options.setdefault("use_native_hstore", False)
    engine = create_engine(url, connect_args=connect_args, **options)
    if engine.dialect.name == "sqlite":
        _sqlite_begin_immediate(engine)
    return engine


def _psycopg(url: str) -> bool:
    """Whether *url* is PostgreSQL through psycopg or psycopg2 (``use_native_hstore``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return False
    return parsed.get_driver_name() in {"psycopg", "psycopg2", "psycopg2cffi"}


def borrowed_sqlite_begin_immediate(engine: Engine) -> Engine:
    """A view of the application's SQLite *engine* whose transactions take the write lock.

    The view shares the engine's pool and settings (``Engine.execution_options``); its
    ``begin`` listener is its own, so the application's transactions stay as they were. A
    connection already in a transaction at BEGIN (the application's own ``begin`` listener
    issued one) is left as it is: the compare-and-set of :mod:`celery_jobreaper.apply` still
    settles each job once there, a concurrent writer then gets "database is locked" instead of
    waiting.
    """
    view = engine.execution_options()

    @event.listens_for(view, "begin")
    def _begin_immediate(conn: Connection) -> None:
        dbapi_connection = conn.connection.dbapi_connection
        if not getattr(dbapi_connection, "in_transaction", False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return view


def _sqlite_begin_immediate(engine: Engine) -> None:
    """Make every SQLite transaction take the write lock at BEGIN.

    SQLite has no row locks: with ``BEGIN IMMEDIATE`` a reaper's read-then-write is
    serialised against other writers, which is what makes compare-and-set exact.
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
