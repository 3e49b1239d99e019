"""jobreaper's own tables checked once, and the configured job sources resolved (a table that
does not exist yet is skipped, warned about, and looked up again)."""

from __future__ import annotations

import logging
import time
from typing import Any

from .database import Database
from .errors import MissingTableError
from .result_backend import ResultRows
from .schema import JobReaperTables, check_stored_version, check_version, create_all
from .settings import Settings
from .sources import JobSource, TrackedJobsSource, UserTableSource, resolve_table
from .textsafe import safe

logger = logging.getLogger(__name__)

#: Seconds between two warnings about one configured table that does not exist (10 minutes).
MISSING_TABLE_REPEAT = 600.0


class Catalog:
    """The sources a reaper judges, and which configured tables are missing."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        tbls: JobReaperTables,
        *,
        skip_missing_tables: bool,
        missing_table_repeat: float = MISSING_TABLE_REPEAT,
        app: Any = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.tables = tbls
        #: a worker skips a configured table that does not exist yet (a migration not run)
        #: and looks it up again on every reap; ``reap()`` from any other process raises
        self.skip_missing_tables = skip_missing_tables
        #: sources skipped by the last :meth:`prepare`: ``jobreaper_sources[i].table`` -> why
        self.missing_sources: dict[str, str] = {}
        #: seconds between two warnings about one missing table
        self.missing_table_repeat = missing_table_repeat
        self._missing_said: dict[str, float] = {}  # key -> when last warned (monotonic)
        self._tables_ready = False
        self._sources: list[JobSource] | None = None
        #: result backend rows (``jobreaper_result_rows``), with *app*'s result backend
        self.result_rows = ResultRows(app, settings, tbls)
        self._result_source: JobSource | None = None
        self._result_pending = True  # not decided yet, or its table does not exist yet

    def prepare_tables(self) -> None:
        """Create (if configured) and check jobreaper's own tables, once."""
        if self._tables_ready:
            return
        stored = create_all(self.db.engine, self.tables) if self.settings.create_tables else None
        if stored is not None:  # read while creating: not read again
            check_stored_version(stored)
        else:
            with self.db.connect() as conn:
                check_version(conn, self.tables)
        self._tables_ready = True

    def prepare(self) -> list[JobSource]:
        """Own tables, then the sources (resolved once; retried while a table is missing)."""
        self.prepare_tables()
        sources = self._sources if self._sources is not None else self._configured()
        if self._result_pending and self.result_rows.off():
            self._result_pending = False  # (no connection checked out, pinged, for nothing)
        if self._result_pending:
            with self.db.connect() as conn:
                self._result_source, self._result_pending = self.result_rows.source(conn)
        return sources if self._result_source is None else [*sources, self._result_source]

    def _configured(self) -> list[JobSource]:
        """Tracked jobs and the user tables of ``jobreaper_sources``."""
        sources: list[JobSource] = []
        missing: dict[str, str] = {}
        if self.settings.track_tasks:
            sources.append(TrackedJobsSource(self.tables))
        if self.settings.sources:  # (checking a connection out pings the database)
            with self.db.connect() as conn:
                for spec in self.settings.sources:
                    try:
                        sources.append(UserTableSource(spec, resolve_table(spec, conn)))
                    except MissingTableError as error:
                        if not self.skip_missing_tables:
                            raise
                        missing[error.key] = error.problem
        now = time.monotonic()
        for key, problem in missing.items():
            said = self._missing_said.get(key)
            if said is not None and now - said < self.missing_table_repeat:
                continue
            self._missing_said[key] = now
            logger.warning(
                "jobreaper: %s: %s; its jobs are not reaped until it exists (looked up again "
                "on every reap; this warning repeats every %g s while it is missing)",
                key,
                safe(problem),
                self.missing_table_repeat,
            )
        for key in self.missing_sources.keys() - missing.keys():
            self._missing_said.pop(key, None)
            logger.info("jobreaper: %s exists now; its jobs are reaped from now on", key)
        self.missing_sources = missing
        if not missing:
            self._sources = sources
        return sources
