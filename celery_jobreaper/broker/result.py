"""The outcome of one broker sweep, shared by every transport."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SweepResult:
    """What a sweep removed, restored or left alone.

    ``removed`` and ``restored`` hold ``(task_id, queue)`` pairs, where *queue* is the Redis
    list key (priority suffix and global key prefix included) or the queue name on other
    transports. ``dropped_unacked`` holds ``(task_id, delivery_tag)`` pairs. In a dry run the
    lists say what *would* have happened.
    """

    removed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    restored: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    dropped_unacked: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: Entries left untouched because their task id (or, for ``unacked``, their queue)
    #: could not be worked out.
    unparsable: int = 0
    #: Entries examined.
    scanned: int = 0
    #: Of ``removed``, the Redis messages too deep in a long list to take out within Redis's
    #: time budget: rewritten in place as already expired, so a worker discards them.
    neutralized: int = 0
    #: True when the sweep stopped early (a bound was hit, or the queue moved under it too
    #: fast); everything it did not examine was left as it was.
    partial: bool = False
    #: Messages purged (``jobreaper_queue_cleanup = "purge"``); ``None``: no purge happened.
    purged: int | None = None
    #: True when the sweep failed (it is logged, and retried on the next run).
    failed: bool = False

    def merge(self, other: SweepResult) -> SweepResult:
        """Add *other*'s entries and counts to this result and return it."""
        self.removed.extend(other.removed)
        self.restored.extend(other.restored)
        self.dropped_unacked.extend(other.dropped_unacked)
        self.unparsable += other.unparsable
        self.scanned += other.scanned
        self.neutralized += other.neutralized
        self.partial = self.partial or other.partial
        self.failed = self.failed or other.failed
        if other.purged is not None:
            self.purged = (self.purged or 0) + other.purged
        return self

    def counts(self) -> dict[str, int]:
        """The counts a run's report shows under ``broker``."""
        if self.failed:
            return {"errors": 1}
        if self.purged is not None:
            return {"purged": self.purged}
        counts = {
            "removed": len(self.removed),
            "restored": len(self.restored),
            "dropped_unacked": len(self.dropped_unacked),
            "unparsable": self.unparsable,
        }
        if self.neutralized:
            counts["neutralized"] = self.neutralized
        return counts
