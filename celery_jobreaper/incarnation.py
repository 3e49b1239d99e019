"""One start of one worker process, as jobreaper records it."""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from datetime import datetime, timedelta

from .clock import monotonic, utcnow


@dataclasses.dataclass(frozen=True)
class Incarnation:
    """One start of one worker process: a fresh id each time, made before the pool forks."""

    id: str
    node: str
    host: str
    pid: int
    started_at: datetime  #: on this host's clock
    #: :func:`~celery_jobreaper.clock.monotonic` at the start (``None``: not known)
    started_monotonic: float | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def new(cls, node: str) -> Incarnation:
        """A new incarnation of *node* for this process, starting now."""
        return cls(uuid.uuid4().hex, node, socket.gethostname(), os.getpid(), utcnow(), monotonic())

    def as_of_now(self) -> Incarnation:
        """This incarnation with its start read on this host's clock as it is now.

        If the host clock stepped back since the start, rows this worker's tasks stamp with it
        may look older than ``started_at``: the start is moved back as far (never forward), so
        they are not taken for an earlier start's.
        """
        if self.started_monotonic is None:
            return self
        up = timedelta(seconds=max(monotonic() - self.started_monotonic, 0.0))
        return dataclasses.replace(self, started_at=min(self.started_at, utcnow() - up))
