"""Reaps asked for by remote control (``celery -A proj control jobreaper_reap``).

The control command runs on the worker's consumer (its event loop, or under gevent its hub):
it only queues the request and replies at once that it was accepted. A real thread of its own
(:class:`~celery_jobreaper.native.Loop`) runs the reap; when the caller gave an address to
report to (``celery jobreaper reap --on``), the report is then published there, as a second
reply under the caller's ticket.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import deque
from typing import Any

from . import broadcast, native
from .reaper import Reaper
from .report import Report
from .textsafe import safe
from .vocabulary import REMOTE

logger = logging.getLogger(__name__)

#: Seconds between two looks of the remote-reap thread at its queue when nothing kicks it
#: (a request kicks it at once: this only bounds a lost wake-up).
POLL = 60.0
#: At most this many requests wait; more are refused (a control command repeated in a loop).
MAX_WAITING = 8
#: A dry run's report lists at most this many planned settlements (the rest are counted).
MAX_PLANNED = 1000


@dataclasses.dataclass(frozen=True)
class ReapRequest:
    """One remote request: what to run, who asked, and where the report goes (if anywhere)."""

    dry_run: bool
    requester: str
    reply_to: dict[str, str] | None = None
    ticket: str | None = None
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])


def report_body(report: Report) -> dict[str, Any]:
    """The report as a remote reply: JSON-friendly, its dry-run plan bounded."""
    body = report.as_dict()
    body["planned"] = report.planned[:MAX_PLANNED]
    body["planned_omitted"] = max(0, len(report.planned) - MAX_PLANNED)
    return body


class RemoteReaps(native.InLoop):
    """Runs queued :class:`ReapRequest` s one after another in a thread of its own."""

    def __init__(self, app: Any, reaper: Reaper, node: str) -> None:
        self.app = app
        self.reaper = reaper
        self.node = node
        self._waiting: deque[ReapRequest] = deque()
        self._guard = native.real_lock()
        self._loop = native.Loop("jobreaper-remote", POLL, self._drain)

    def request(self, req: ReapRequest) -> dict[str, Any]:
        """Queue *req* (any thread or greenlet; never blocks) and return the control reply."""
        if not self._loop.is_alive():
            return {"error": "jobreaper does not run remote reaps on this worker now"}
        with self._guard:
            if len(self._waiting) >= MAX_WAITING:
                return {"error": f"{MAX_WAITING} remote reaps are already waiting; not queued"}
            self._waiting.append(req)
        logger.info(
            "jobreaper: %sreap requested by %s (remote control, request %s)",
            "dry-run " if req.dry_run else "",
            safe(req.requester),
            req.id,
        )
        self._loop.kick()
        return {"ok": "reap requested", "request": req.id, "dry_run": req.dry_run}

    def _next(self) -> ReapRequest | None:
        with self._guard:
            return self._waiting.popleft() if self._waiting else None

    def _drain(self) -> None:
        """(The thread.) Run every waiting request; report each where its caller asked."""
        while (req := self._next()) is not None:
            body = self._run(req)
            if req.reply_to is not None and req.ticket is not None:
                self._send(req, body)

    def _run(self, req: ReapRequest) -> dict[str, Any]:
        try:
            report = self.reaper.run(REMOTE, dry_run=req.dry_run)
        except Exception as error:  # logged by the reaper's run log; the caller hears of it
            last = self.reaper.last_report
            if last is not None and last.trigger == REMOTE and last.error is not None:
                return {"request": req.id, "report": report_body(last)}
            return {"request": req.id, "error": f"{type(error).__name__}: {error}"}
        return {"request": req.id, "report": report_body(report)}

    def _send(self, req: ReapRequest, body: dict[str, Any]) -> None:
        assert req.reply_to is not None and req.ticket is not None
        try:
            broadcast.reply(self.app, req.reply_to, req.ticket, {self.node: body})
        except Exception:
            logger.exception(
                "jobreaper: could not send the report of remote reap %s to its caller", req.id
            )
