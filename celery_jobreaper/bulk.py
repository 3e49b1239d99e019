"""Set-based settling for PostgreSQL when SQL can decide.

For a user table with neither an owner nor a task-id column, :func:`planner.decide
<celery_jobreaper.planner.decide>` judges a row on the row's own columns (kind, started_at,
status) and on constants of the run (now, ``grace``, ``max_age``, the policies, whether another
live worker exists). SQL can then decide too, and one statement per batch does what the Python
path does with a read, a lock, an update and a ledger insert::

    WITH jr_page AS (                -- the next batch by id (keyset), locked, with the
        SELECT ctid, id, status, kind, <verdict>     -- planner's verdict: fail, or why not
        FROM <table> WHERE status IN (…) AND id > :after
        ORDER BY id LIMIT :batch_size FOR UPDATE SKIP LOCKED),
    jr_upd AS (                      -- fail those to fail, with planner._fail's error text
        UPDATE <table> SET status = …, completed_at = :now, error = <text>
        FROM jr_page WHERE ctid = jr_page.ctid AND id = jr_page.id AND verdict = fail
        AND status IN (…) RETURNING …),
    jr_ins AS (INSERT INTO jobreaper_events (…) SELECT … FROM jr_upd)
    SELECT <the settled jobs, or their number> FROM jr_upd
    UNION ALL SELECT <rows left alone, by verdict and kind> FROM jr_page GROUP BY …
    UNION ALL SELECT <page size, last id> FROM jr_page

``LIMIT`` counts the rows that ``SKIP LOCKED`` did not skip, and the next batch starts after
the page's last id whatever became of its rows: rows left alone (young, ignored, not provably
stale) neither end the loop early nor hide later rows, and a page shorter than the batch size
means that no unlocked stale row is left. Rows changed by another transaction since the
statement began are re-checked (verdict included) as they are locked, and the UPDATE compares
the status again: each job is settled once, with one event, in the transaction of its batch.
When the rule can fail no row (other live workers and no ``max_age``), one aggregate query
counts the rows left alone instead.

A table with a stale row whose start is unknown (``NULL``, or no ``started_at`` column) is
left to the Python path (:func:`any_start_unknown`): such a row is aged by the reaper's first
sightings (:mod:`.sightings`), noted every run, batch by batch. One that appears after that
probe still fails on "no live worker" here only if this reaper has seen it for the heartbeat
timeout (``id = ANY(:jr_seen_before)``); the others come back (tagged) to be noted as seen.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    CHAR,
    DateTime,
    Integer,
    String,
    Uuid,
    func,
    select,
)
from sqlalchemy.engine import Connection

from .bulk_rule import BulkRule, glob_to_like, reason_for
from .bulk_statement import PAGE_TAG, SEEN_TAG, SETTLED_TAG, batch_statement, kind_text, stale
from .pgarrays import send_arrays_in_binary
from .planner import NO_LIVE_WORKER_LEFT, Decision, older_than_max_age
from .rules import OwnerlessRule
from .schema import JobReaperTables
from .settings import Settings
from .sources.base import Candidate, JobSource, any_stale
from .timezones import localize
from .vocabulary import MAX_AGE, NO_LIVE_WORKER

#: Private switch (tests turn it off to compare with the Python path); not a setting.
ENABLED = True


@dataclasses.dataclass
class BatchResult:
    """What one batch did: rows looked at, jobs settled, rows left alone by reason."""

    seen: int  #: stale-status rows looked at (the report's candidates)
    settled: int  #: jobs settled
    left_alone: Counter[str]  #: reason -> rows
    more: bool  #: whether a next batch may find more rows
    last: Any  #: id to continue after
    #: ``(job_id, status, kind, started_at, error)`` of each job settled, if asked for
    rows: list[Any] = dataclasses.field(default_factory=list)
    #: ids of the rows whose start is unknown left alone as not seen long enough (to note)
    unseen: list[Any] = dataclasses.field(default_factory=list)


def settler_for(
    conn: Connection,
    source: JobSource,
    tables: JobReaperTables,
    settings: Settings,
    rule: OwnerlessRule,
    *,
    dry_run: bool,
    now: datetime,
    run_id: int | None,
) -> BulkSettler | None:
    """A :class:`BulkSettler` for *source* if SQL can decide all its rows, else ``None``."""
    if not ENABLED or dry_run or conn.dialect.name != "postgresql":
        return None
    if source.has_owner or source.has_task_id:
        return None
    cols: dict[str, Any] | None = getattr(source, "cols", None)
    if cols is None or set(source.target.guards) - {"started_at"}:
        return None  # not a user table (tracked jobs have owners anyway)
    kind = cols.get("kind")
    started = cols.get("started_at")
    if not (_plain_text(cols["status"]) and _id_as_text(cols["id"])):
        return None
    if started is None:
        return None  # every start unknown: see any_start_unknown
    if kind is not None and not _plain_text(kind):
        return None
    error = source.target.error
    if error is not None and not _plain_text(error):
        return None
    if started is not None and not isinstance(started.type, DateTime):
        return None  # a DATE column: leave it to the Python path (and its behaviour)
    ignore: list[tuple[str, bool]] = []
    if kind is not None:
        rules = list(settings.policies)
        while rules and rules[-1][1] != "ignore":
            rules.pop()  # trailing 'fail' globs change nothing: 'fail' is the default
        for pattern, action in rules:
            like = glob_to_like(pattern)
            if like is None:
                return None
            ignore.append((like, action == "ignore"))
    return BulkSettler(
        source,
        tables,
        settings,
        rule,
        now=now,
        run_id=run_id,
        kind=kind,
        started=started,
        ignore=ignore,
    )


def any_start_unknown(conn: Connection, settler: BulkSettler) -> bool:
    """Whether the settler's source has a row in a stale status with no start (one probe,
    ``LIMIT 1``). Such rows are aged by the reaper's first sightings, noted every run and
    batch by batch: the Python path does that (here every page would bind every sighting, and
    runs with a live worker would note none), so the source is left to it."""
    started = settler.started
    return started is None or any_stale(conn, settler.source, started.is_(None))


def _plain_text(column: Any) -> bool:
    """A string column whose Python value and ``CAST(… AS TEXT)`` agree."""
    t = column.type
    return (
        isinstance(t, String)
        and not isinstance(t, CHAR)  # blank-padded: comparisons and casts trim
        and getattr(t, "enum_class", None) is None  # Python enum members, not their labels
    )


def _id_as_text(column: Any) -> bool:
    """An id whose ``str()`` in Python equals its ``CAST(… AS TEXT)`` in PostgreSQL."""
    return isinstance(column.type, (Integer, Uuid)) or _plain_text(column)


class BulkSettler:
    """Settles one source's stale rows batch by batch, one statement per batch."""

    def __init__(
        self,
        source: JobSource,
        tables: JobReaperTables,
        settings: Settings,
        rule: OwnerlessRule,
        *,
        now: datetime,
        run_id: int | None,
        kind: Any,
        started: Any,
        ignore: Sequence[tuple[str, bool]],
    ) -> None:
        self.source = source
        self.target = source.target
        self.events = tables.events
        self.batch_size = settings.batch_size
        self.kind = kind
        self.started = started
        none_live = rule.nobody_could_run  # the one rule for jobs without owner (rules.py)
        self.rule = rule
        #: the *where* of every failure in this run (``None``: the rule fails no row)
        self.where: str | None = NO_LIVE_WORKER_LEFT if none_live else None
        if not none_live and settings.max_age is not None:
            self.where = older_than_max_age(settings.max_age)
        self.none_live = none_live
        #: the rule's verdicts in SQL
        self.sql_rule = BulkRule(
            self.target,
            kind,
            started,
            tuple(ignore),
            none_live=none_live,
            has_max_age=settings.max_age is not None,
        )
        self.params: dict[str, Any] = {
            "jr_now": now,
            "jr_young_after": now - timedelta(seconds=settings.grace),
            "jr_alone_before": now - timedelta(seconds=rule.alone_after),
            "jr_run_id": run_id,
        }
        if settings.max_age is not None:
            self.params["jr_old_before"] = now - timedelta(seconds=settings.max_age)
        if self.target.completed_at is not None:
            self.params["jr_completed"] = now
        self._statements: dict[tuple[bool, bool], Any] = {}

    def batch(
        self,
        conn: Connection,
        after: Any,
        *,
        detail: bool = True,
        seen_before: Sequence[Any] = (),
    ) -> BatchResult:
        """Settle the next batch of rows with an id above *after* (``None``: from the start).

        Call inside a transaction. With *detail*, the settled jobs come back as ``rows`` (for
        logs and signals; see :meth:`decisions`), else only their number. When the rule can
        fail no row, every row is counted at once (and ``more`` is false). *seen_before*: ids
        of rows whose start is unknown that this reaper has seen long enough to fail them on
        "no live worker" (:meth:`OwnerlessRule.seen_before
        <celery_jobreaper.rules.OwnerlessRule.seen_before>`); the others of those rows are
        left alone and come back as ``unseen``.
        """
        if self.where is None:
            return self._count_all(conn)
        key = (after is not None, detail)
        stmt = self._statements.get(key)
        if stmt is None:
            stmt = self._statements[key] = batch_statement(self, after=key[0], detail=key[1])
        params = self.params if after is None else {**self.params, "jr_after": after}
        if self.none_live:
            send_arrays_in_binary(conn)
            params = {**params, "jr_seen_before": list(seen_before)}
        seen = settled = 0
        last = None
        rows: list[Any] = []
        unseen: list[Any] = []
        left: Counter[str] = Counter()
        for row in conn.execute(stmt, params).all():
            tag = row[0]
            if tag == SEEN_TAG:
                unseen.append(row[1])
            elif tag == SETTLED_TAG:
                if detail:
                    rows.append(row[1:6])
                    settled += 1
                else:
                    settled = row[6]
            elif tag == PAGE_TAG:
                seen, last = row[6], row[1]
            else:
                left[reason_for(tag, row[3])] += row[6]
        return BatchResult(seen, settled, left, seen >= self.batch_size, last, rows, unseen)

    @property
    def cause(self) -> str:
        """Why this run's failures fail (the metrics' label): no worker at all, or too old."""
        return NO_LIVE_WORKER if self.where == NO_LIVE_WORKER_LEFT else MAX_AGE

    def decisions(self, rows: list[Any]) -> list[Decision]:
        """The planner's decisions for the settled *rows* of a batch."""
        name, where, zone = self.source.name, self.where, self.target.zone
        assert where is not None
        idle = where == NO_LIVE_WORKER_LEFT  # rows without task id: as the planner marks them
        return [
            Decision(
                Candidate(name, job_id, status, kind, localize(started, zone)),
                "fail",
                where,
                error,
                idle,
                cause=self.cause,
            )
            for job_id, status, kind, started, error in rows
        ]

    def _count_all(self, conn: Connection) -> BatchResult:
        rows = (
            select(
                kind_text(self.kind).label("jr_kind"), self.sql_rule.verdict().label("jr_verdict")
            )
            .where(stale(self.target, after=False))
            .subquery("jr_rows")
        )
        stmt = select(rows.c.jr_verdict, rows.c.jr_kind, func.count()).group_by(
            rows.c.jr_verdict, rows.c.jr_kind
        )
        left: Counter[str] = Counter()
        for verdict, kind, count in conn.execute(stmt, self.params):
            left[reason_for(verdict, kind)] += count
        return BatchResult(sum(left.values()), 0, left, more=False, last=None)
