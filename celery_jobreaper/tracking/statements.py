"""Per-dialect SQL of tracking: the start upsert and the fenced finish, built once per dialect."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import (
    DateTime,
    String,
    Table,
    Text,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection

from ..clock import db_ago, db_now
from ..vocabulary import DEAD, RUNNING
from .records import _Finish, _finish_values

#: Columns a start writes; a retry or redelivery of a known task id resets them all (and keeps
#: ``times_reaped``).
_RESET = (
    "task_name",
    "status",
    "incarnation_id",
    "node",
    "started_at",
    "completed_at",
    "error",
    "fence",
)
_UPSERTED = ("task_id", *_RESET)


#: Dialects whose tracking writer connection is in autocommit mode (see ``Tracker._apply``).
_AUTOCOMMIT = frozenset({"postgresql", "mysql", "mariadb"})


def _autocommit(conn: Connection) -> bool:
    return (
        conn.dialect.name in _AUTOCOMMIT
        and conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    )


class Statements:
    """The statements a tracker writes ``jobreaper_jobs`` with (per dialect, made when first
    needed): a multi-row upsert of starts, a fenced compare-and-set of finishes, and the
    heartbeat that vouches for new running jobs."""

    def __init__(self, jobs: Table, incarnations: Table) -> None:
        self.t = t = jobs
        self.inc = incarnations
        self._vouches: dict[tuple[str, float], Any] = {}  # (dialect, age) -> vouch statement
        self._insert = insert(t)
        self._restart = update(t).where(t.c.task_id == bindparam("jr_task_id"))
        self._finish = update(t).where(
            t.c.task_id == bindparam("jr_task_id"), t.c.status == RUNNING
        )
        self._finish_fenced = self._finish.where(t.c.fence == bindparam("jr_fence"))
        self._upserts: dict[str, Any] = {}  # dialect name -> upsert statement (None: none)
        self._pg_finish: Any = None
        self._pg_upsert_sql: str | None = None

    def vouch(self, conn: Connection, incarnation_id: str, *, older_than: float) -> bool:
        """Heartbeat *incarnation_id* now (the database's clock) if it was marked dead or its
        heartbeat is older than *older_than* seconds (the mark undone); True if it did (this
        worker was quiet long enough to be judged dead: a pause).

        Run first in the transaction that writes running jobs of that incarnation: a worker
        declared dead during a pause that wakes and starts a job cannot have the job read by a
        reaper without this proof of life, committed with it (DESIGN §2.1). A reaper judges a
        worker dead on a heartbeat older than the heartbeat timeout (its own earlier start:
        two intervals); *older_than* is below both, so whenever such a verdict could stand on
        the current heartbeat it is renewed here, and a reaper that judged earlier sees the
        heartbeat changed when it reads the owners again. One statement, so a concurrent
        ``mark_dead`` cannot come between a state check and the renewal. Otherwise it matches no
        row: it writes nothing and hold no lock (MySQL/MariaDB: in READ COMMITTED), so a
        flush that stalls holds up no heartbeat and no reaper.
        """
        name = conn.dialect.name
        key = (name, older_than)
        stmt = self._vouches.get(key)
        if stmt is None:
            inc = self.inc
            stmt = self._vouches[key] = (
                update(inc)
                .where(
                    inc.c.id == bindparam("jr_incarnation"),
                    or_(inc.c.state == DEAD, inc.c.heartbeat_at < db_ago(name, older_than)),
                )
                .values(
                    heartbeat_at=db_now(name),
                    state=case((inc.c.state == DEAD, RUNNING), else_=inc.c.state),
                )
            )
        return bool(conn.execute(stmt, {"jr_incarnation": incarnation_id}).rowcount == 1)

    def upsert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert the rows; a known task id gets its row reset (``times_reaped`` kept)."""
        name = conn.dialect.name
        if name not in self._upserts:
            self._upserts[name] = self._upsert_statement(name)
        stmt = self._upserts[name]
        if name == "postgresql":  # one statement whatever the row count: columns as arrays
            params = {f"jr_{c}": [row[c] for row in rows] for c in _UPSERTED}
            if conn.dialect.driver == "psycopg":
                # The hottest statement: sent as compiled once, its arrays dumped in binary
                # (what it costs in Python is time the pool process's tasks wait for).
                if self._pg_upsert_sql is None:
                    sql = str(stmt.compile(dialect=conn.dialect))
                    self._pg_upsert_sql = re.sub(r"%\((\w+)\)s", r"%(\1)b", sql)
                conn.exec_driver_sql(self._pg_upsert_sql, params)
            else:
                conn.execute(stmt, params)
            return
        if stmt is not None:
            conn.execute(stmt, rows)
            return
        for row in rows:  # a dialect without an upsert: update, else insert
            values = {c: row[c] for c in _RESET}
            if not conn.execute(self._restart, {"jr_task_id": row["task_id"], **values}).rowcount:
                conn.execute(self._insert, row)

    def _upsert_statement(self, dialect: str) -> Any:
        t = self.t
        if dialect == "postgresql":
            # INSERT … SELECT … FROM unnest(:task_ids, :task_names, …) ON CONFLICT DO UPDATE
            v = (
                func.unnest(
                    *(bindparam(f"jr_{c}", type_=postgresql.ARRAY(t.c[c].type)) for c in _UPSERTED)
                )
                .table_valued(*_UPSERTED)
                .render_derived(name="jr_v")
            )
            rows = select(*(v.c[c] for c in _UPSERTED), literal_column("0")).select_from(v)
            pg = postgresql.insert(t).from_select([*_UPSERTED, "times_reaped"], rows)
            return pg.on_conflict_do_update(
                index_elements=[t.c.task_id], set_={c: pg.excluded[c] for c in _RESET}
            )
        if dialect == "sqlite":
            lite = sqlite.insert(t)
            return lite.on_conflict_do_update(
                index_elements=[t.c.task_id], set_={c: lite.excluded[c] for c in _RESET}
            )
        if dialect in {"mysql", "mariadb"}:
            my = mysql.insert(t)
            return my.on_duplicate_key_update({c: my.inserted[c] for c in _RESET})
        return None

    def complete(self, conn: Connection, finishes: list[_Finish]) -> list[tuple[str, str]]:
        """Apply the finishes (fenced compare-and-set); return those that changed nothing."""
        fenced: list[_Finish] = []
        for f in finishes:
            if f.fence is None:  # no fence held: complete whatever still runs
                conn.execute(self._finish, _finish_values(f))
            else:
                fenced.append(f)
        if not fenced:
            return []
        if conn.dialect.name == "postgresql" and len(fenced) > 1:
            done = set(
                conn.execute(
                    self._pg_finish_statement(),
                    {
                        "jr_ids": [f.task_id for f in fenced],
                        "jr_fences": [f.fence for f in fenced],
                        "jr_statuses": [f.status for f in fenced],
                        "jr_completed": [f.completed_at for f in fenced],
                        "jr_errors": [f.error for f in fenced],
                    },
                ).scalars()
            )
        else:
            done = {
                f.task_id
                for f in fenced
                # One statement: applies only while the row still holds our fence.
                if conn.execute(
                    self._finish_fenced, {**_finish_values(f), "jr_fence": f.fence}
                ).rowcount
            }
        return [(f.task_id, f.status) for f in fenced if f.task_id not in done]

    def _pg_finish_statement(self) -> Any:
        """``UPDATE jobs SET … FROM unnest(:ids, :fences, …) v WHERE … RETURNING task_id``."""
        if self._pg_finish is None:
            t = self.t
            array = postgresql.ARRAY
            v = (
                func.unnest(
                    bindparam("jr_ids", type_=array(String())),
                    bindparam("jr_fences", type_=array(String())),
                    bindparam("jr_statuses", type_=array(String())),
                    bindparam("jr_completed", type_=array(DateTime())),
                    bindparam("jr_errors", type_=array(Text())),
                )
                .table_valued("task_id", "fence", "status", "completed_at", "error")
                .render_derived(name="jr_v")
            )
            self._pg_finish = (
                update(t)
                .where(t.c.task_id == v.c.task_id, t.c.fence == v.c.fence, t.c.status == RUNNING)
                .values(status=v.c.status, completed_at=v.c.completed_at, error=v.c.error)
                .values(fence=None)
                .returning(t.c.task_id)
            )
        return self._pg_finish
