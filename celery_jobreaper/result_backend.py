"""The ``jobreaper_result_rows`` switch: whether result backend rows are a source — Celery's
database backend (``db+…``) or django-celery-results' (``django-db``).

Settling a result row and writing its ledger event happen in one transaction, so the rows are
reaped only when the result backend's database is jobreaper's own (same dialect, host, port,
database and user; for SQLite the same file). ``"auto"`` (the default) turns the source on
when the app's result backend is one of these in that database and ``task_track_started`` is
on (without it a task never shows ``STARTED``); ``True`` turns it on whenever the backend is
one of these, and refuses a backend in another database; ``False`` turns it off.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sqlalchemy import MetaData, Table, inspect
from sqlalchemy.engine import URL, Connection, make_url

from .errors import ConfigurationError
from .schema import JobReaperTables
from .settings import Settings
from .sources.result_codecs import DjangoResultCodec, SQLAlchemyResultCodec
from .sources.result_rows import ResultRowsSource
from .textsafe import safe

logger = logging.getLogger(__name__)

KEY = "jobreaper_result_rows"


def is_database_backend(backend: Any) -> bool:
    """Whether *backend* is Celery's ``DatabaseBackend`` (or a subclass of it)."""
    return any(
        cls.__name__ == "DatabaseBackend" and cls.__module__ == "celery.backends.database"
        for cls in type(backend).__mro__
    )


def is_django_backend(backend: Any) -> bool:
    """Whether *backend* is django-celery-results' ``DatabaseBackend`` (or a subclass)."""
    return any(
        cls.__name__ == "DatabaseBackend"
        and cls.__module__ == "django_celery_results.backends.database"
        for cls in type(backend).__mro__
    )


#: Django's database ENGINE (last part) -> SQLAlchemy dialect name.
_DJANGO_DIALECTS = {"postgresql": "postgresql", "mysql": "mysql", "sqlite3": "sqlite"}


def django_url(backend: Any) -> URL:
    """The URL of the database django-celery-results writes ``TaskResult`` rows to."""
    from django.db import connections, router

    alias = router.db_for_write(backend.TaskModel) or "default"
    conf = connections[alias].settings_dict
    dialect = _DJANGO_DIALECTS.get(str(conf.get("ENGINE", "")).rsplit(".", 1)[-1], "unknown")
    port = conf.get("PORT")
    return URL.create(
        dialect,
        username=conf.get("USER") or None,
        host=conf.get("HOST") or None,
        port=int(port) if port else None,
        database=str(conf["NAME"]) if conf.get("NAME") else None,
    )


def same_database(a: URL, b: URL) -> bool:
    """Whether two URLs name one database (drivers and passwords aside)."""
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        if not a.database or not b.database or ":memory:" in (a.database, b.database):
            return False
        return os.path.realpath(a.database) == os.path.realpath(b.database)
    ports_agree = a.port == b.port or None in (a.port, b.port)
    return ports_agree and (a.host, a.database, a.username) == (b.host, b.database, b.username)


class ResultRows:
    """Makes the result-rows source when the switch and the configuration say so."""

    def __init__(self, app: Any, settings: Settings, tables: JobReaperTables) -> None:
        self.app = app
        self.mode = settings.result_rows
        self.tables = tables
        self._said: set[str] = set()

    def off(self) -> bool:
        """Whether the source is off without a look at any backend or database."""
        if self.mode is False or self.app is None:
            return True
        # "auto" without a result backend: do not build Celery's disabled one
        return self.mode == "auto" and not self.app.conf.result_backend

    def source(self, conn: Connection) -> tuple[ResultRowsSource | None, bool]:
        """The source (or ``None``), and whether to look again next time (its table does
        not exist yet: Celery creates it on its first write)."""
        if self.off():
            return None, False
        try:
            backend = self.app.backend  # (Celery's database backend may connect here)
        except Exception as error:
            if self.mode is True:
                raise
            # "auto": the result backend's trouble must not stop the reaping of the rest
            logger.warning(
                "jobreaper: Celery's result backend could not be set up (%s); its rows are "
                "not reaped this time",
                safe(f"{type(error).__name__}: {error}".splitlines()[0]),
            )
            return None, True
        celery_db, django_db = is_database_backend(backend), is_django_backend(backend)
        if not (celery_db or django_db):
            if self.mode is True:
                raise ConfigurationError(
                    KEY,
                    "True needs Celery's database result backend (result_backend = 'db+…') or "
                    f"django-celery-results' ('django-db'); this app's is "
                    f"{type(backend).__name__}",
                )
            return None, False
        if self.mode == "auto" and not self.app.conf.task_track_started:
            self._say("off", "task_track_started is off (no task is ever STARTED)")
            return None, False
        theirs = make_url(backend.url) if celery_db else django_url(backend)
        ours = conn.engine.url
        if not same_database(theirs, ours):
            why = (
                f"the result backend's database ({theirs.render_as_string()}) is not "
                f"jobreaper's ({ours.render_as_string()}); a row and its ledger event must "
                "change in one transaction"
            )
            if self.mode is True:
                raise ConfigurationError(KEY, why)
            self._say("off", why)
            return None, False
        name, schema = _table_of(backend, celery_db)
        if not inspect(conn).has_table(name, schema=schema):
            self._say("missing", f"{name} does not exist yet (looked up again next time)")
            return None, True
        codec: SQLAlchemyResultCodec | DjangoResultCodec = (
            SQLAlchemyResultCodec(backend)
            if celery_db
            else DjangoResultCodec(backend, Table(name, MetaData(), autoload_with=conn))
        )
        source = ResultRowsSource(codec, self.tables)
        self._say("on", f"reaping STARTED/RETRY rows of {source.name}")
        return source, False

    def _say(self, state: str, why: str) -> None:
        if state in self._said:
            return
        self._said.add(state)
        logger.info("jobreaper: Celery's result rows (%s): %s", KEY, safe(why))


def _table_of(backend: Any, celery_db: bool) -> tuple[str, str | None]:
    """The result table's name and schema."""
    if celery_db:
        table = backend.task_cls.__table__
        return str(table.name), table.schema
    return str(backend.TaskModel._meta.db_table), None
