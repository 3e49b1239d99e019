"""What the database phase of one reap settled: the value the broker sweep receives."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime
from typing import Any

from .livenessview import LivenessView


@dataclasses.dataclass
class Tally:
    """The database phase's running counts (kept by the reaper; read back if it fails)."""

    trigger: str
    dry_run: bool
    started_at: datetime  #: the database's clock once the run has assessed liveness
    node: str | None = None
    run_id: int | None = None
    candidates: int = 0
    settled: int = 0  #: jobs this run changed (always 0 in a dry run)
    would_settle: int = 0  #: jobs a dry run would have changed
    left_alone: Counter[str] = dataclasses.field(default_factory=Counter)  # reason -> count
    per_source: Counter[str] = dataclasses.field(default_factory=Counter)  # settled per source
    planned: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # dry-run plan
    #: task ids of the jobs settled as failed (in a dry run: that would have been)
    task_ids: set[str] = dataclasses.field(default_factory=set)
    #: jobs settled, per (source, kind, cause): kind ``""`` where a batch was counted, not read
    settled_by: Counter[tuple[str, str, str]] = dataclasses.field(default_factory=Counter)
    #: live workers the run saw, this one included (``None`` before liveness was judged)
    live_workers: int | None = None


@dataclasses.dataclass(frozen=True)
class Settled:
    """What one run's database phase settled, as the broker sweep receives it."""

    trigger: str
    dry_run: bool
    started_at: datetime  #: the run's time (the database's clock)
    node: str | None
    run_id: int | None
    view: LivenessView
    #: task ids of the jobs settled as failed (in a dry run: that would have been)
    task_ids: frozenset[str]

    @classmethod
    def of(cls, tally: Tally, view: LivenessView) -> Settled:
        """The value of a finished database phase."""
        return cls(
            trigger=tally.trigger,
            dry_run=tally.dry_run,
            started_at=tally.started_at,
            node=tally.node,
            run_id=tally.run_id,
            view=view,
            task_ids=frozenset(tally.task_ids),
        )
