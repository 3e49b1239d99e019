"""Tracking records: what a task signal queues (a start, a finish) and how a flush orders them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..vocabulary import FAILED, RETRY, REVOKED, RUNNING, SUCCEEDED

_STATUS = {
    "SUCCESS": SUCCEEDED,
    "FAILURE": FAILED,
    "RETRY": RETRY,
    "REVOKED": REVOKED,
    "IGNORED": SUCCEEDED,
    "REJECTED": FAILED,
}


@dataclasses.dataclass(slots=True)
class _Start:
    """This process started a task and holds *fence* for it."""

    task_id: str
    task_name: str
    node: str
    incarnation_id: str
    started_at: datetime
    fence: str
    seq: int = 0


@dataclasses.dataclass(slots=True)
class _Finish:
    """This process finished a task; applied only while the row still holds *fence*."""

    task_id: str
    fence: str | None
    status: str
    completed_at: datetime
    error: str | None
    seq: int = 0


_Record = _Start | _Finish


def _finish_values(f: _Finish) -> dict[str, Any]:
    return {
        "jr_task_id": f.task_id,
        "status": f.status,
        "completed_at": f.completed_at,
        "error": f.error,
        "fence": None,
    }


def _rounds(records: Sequence[_Record]) -> list[tuple[dict[str, dict[str, Any]], list[_Finish]]]:
    """Split *records* into rounds that keep each task's records in order.

    In a round a task has at most one start and one finish, and the round's starts are written
    before its finishes; a finish of the start in the same round (same fence) is merged into
    the start's row (written once, with its final status). A task whose next record cannot go
    in its current round goes on in the next one.
    """
    rounds: list[tuple[dict[str, dict[str, Any]], list[_Finish]]] = []
    where: dict[str, tuple[int, str]] = {}  # task id -> (its round, "start" / "finish" / "both")

    def round_(i: int) -> tuple[dict[str, dict[str, Any]], list[_Finish]]:
        if i == len(rounds):
            rounds.append(({}, []))
        return rounds[i]

    for r in records:
        seen = where.get(r.task_id)
        if isinstance(r, _Start):
            i = 0 if seen is None else seen[0] + 1
            round_(i)[0][r.task_id] = {
                "task_id": r.task_id,
                "task_name": r.task_name,
                "status": RUNNING,
                "incarnation_id": r.incarnation_id,
                "node": r.node,
                "started_at": r.started_at,
                "completed_at": None,
                "error": None,
                "fence": r.fence,
                "times_reaped": 0,
            }
            where[r.task_id] = (i, "start")
            continue
        if seen is not None and seen[1] == "start" and r.fence is not None:
            row = rounds[seen[0]][0][r.task_id]
            if row["fence"] == r.fence:  # started and finished in this flush: one row
                row.update(status=r.status, completed_at=r.completed_at, error=r.error, fence=None)
                where[r.task_id] = (seen[0], "both")
                continue
        i = 0 if seen is None else seen[0] + 1
        round_(i)[1].append(r)
        where[r.task_id] = (i, "finish")
    return rounds
