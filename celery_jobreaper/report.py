"""The outcome of one reap, as returned by :func:`celery_jobreaper.reap` and kept for inspect."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime
from typing import Any

from .broker.result import SweepResult
from .settled import Tally


@dataclasses.dataclass
class Report:
    """Counts and details of one reap run."""

    trigger: str
    dry_run: bool
    started_at: datetime
    node: str | None = None
    run_id: int | None = None
    candidates: int = 0
    settled: int = 0  #: jobs this run changed (always 0 in a dry run)
    would_settle: int = 0  #: jobs a dry run would have changed
    left_alone: Counter[str] = dataclasses.field(default_factory=Counter)  # reason -> count
    per_source: Counter[str] = dataclasses.field(default_factory=Counter)  # settled per source
    planned: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # dry-run plan
    broker: dict[str, int] = dataclasses.field(default_factory=dict)
    duration: float = 0.0  #: seconds
    error: str | None = None
    #: jobs settled per (source, kind, cause); see :attr:`Tally.settled_by`
    settled_by: Counter[tuple[str, str, str]] = dataclasses.field(default_factory=Counter)
    #: live workers the run saw, this one included (``None``: liveness was not judged)
    live_workers: int | None = None

    @classmethod
    def assemble(
        cls, tally: Tally, swept: SweepResult | None, *, duration: float, error: str | None
    ) -> Report:
        """The report of a run: what its database phase counted and what its sweep returned."""
        return cls(
            trigger=tally.trigger,
            dry_run=tally.dry_run,
            started_at=tally.started_at,
            node=tally.node,
            run_id=tally.run_id,
            candidates=tally.candidates,
            settled=tally.settled,
            would_settle=tally.would_settle,
            left_alone=Counter(tally.left_alone),
            per_source=Counter(tally.per_source),
            planned=list(tally.planned),
            broker={} if swept is None else swept.counts(),
            duration=duration,
            error=error,
            settled_by=Counter(tally.settled_by),
            live_workers=tally.live_workers,
        )

    @property
    def ok(self) -> bool:
        """Whether the run finished without error."""
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (for ``inspect jobreaper`` and the CLI)."""
        return {
            "trigger": self.trigger,
            "dry_run": self.dry_run,
            "started_at": self.started_at.isoformat() + "Z",
            "node": self.node,
            "run_id": self.run_id,
            "candidates": self.candidates,
            "settled": self.settled,
            "would_settle": self.would_settle,
            "left_alone": dict(self.left_alone),
            "per_source": dict(self.per_source),
            "broker": dict(self.broker),
            "duration": round(self.duration, 6),
            "error": self.error,
        }
