"""Pruning from the workers' own cycle: every ``jobreaper_prune_interval`` seconds, on the
worker that holds the cluster's maintenance lease only (see :mod:`celery_jobreaper.lease`).

It runs in a real thread of its own (:class:`~celery_jobreaper.native.Loop`), not in the reap
loop, so a long prune never delays a reap. A prune is safe to run twice at once (each ``DELETE``
checks its rows again), so a leader that loses the lease mid-prune does no harm; it just stops
pruning from its next tick.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .database import Database
from .native import InLoop, Loop
from .prune import Pruner, PruneResult, targets_for
from .settings import Settings

if TYPE_CHECKING:
    from .lease import Lease

logger = logging.getLogger(__name__)


class PruneCycle(InLoop):
    """Prunes every *every* seconds while this worker leads (every worker if *lease* is
    ``None``)."""

    def __init__(self, db: Database, settings: Settings, lease: Lease | None, every: float) -> None:
        self.db = db
        self.settings = settings
        self.lease = lease
        self.every = every  #: seconds
        self.last: PruneResult | None = None
        self._loop = Loop("jobreaper-prune", every, self.tick)

    def tick(self) -> None:
        """(The thread.) One prune, if this worker leads now."""
        if self.lease is not None and not self.lease.leads:
            return
        pruner = Pruner(
            self.db,
            targets_for(self.settings, self.db),
            batch=self.settings.batch_size,
            max_rows=self.settings.prune_max_rows,
        )
        self.last = pruner.run(dry_run=self.settings.dry_run)
