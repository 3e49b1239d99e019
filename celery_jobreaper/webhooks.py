"""Each run's report, posted as JSON to the configured URLs from a thread of its own.

A reap never waits for a webhook and never fails because of one: :meth:`Webhooks.notify` only
puts the report on a bounded queue. The posting thread sends it to every URL with a timeout,
retries what may succeed later (no answer, a 5xx, 408, 429) with a doubling pause, and logs
what it finally could not deliver.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kombu.utils.url import maybe_sanitize_url

from . import native

if TYPE_CHECKING:
    from .report import Report
    from .settings import Settings

logger = logging.getLogger(__name__)

#: reports waiting to be posted; beyond this the oldest waiting one is dropped (and logged)
CAPACITY = 100
#: seconds before the first retry; doubled before each further one
FIRST_PAUSE = 0.5
#: answers worth another try: timeouts and overload on the receiving side
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class Webhooks:
    """Posts reports that settled something to *urls* (``jobreaper_webhooks``).

    The posting thread is a real OS thread (:mod:`celery_jobreaper.native`), also under
    gevent, where a green thread started from jobreaper's loop thread would never run.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float,
        retries: int,
        headers: Mapping[str, str] | None = None,
        first_pause: float = FIRST_PAUSE,
    ) -> None:
        self.urls = tuple(urls)
        self.timeout = timeout  #: seconds per request
        self.retries = retries  #: further tries after the first one, per URL
        self.headers = {"Content-Type": "application/json", **dict(headers or {})}
        self.first_pause = first_pause  #: seconds
        self._waiting: deque[bytes] = deque()
        self._guard = native.real_lock()
        self._wake = native.Wakeup()
        self._running: Any = None  # held while the posting thread runs
        self._closed = False

    def notify(self, report: Report) -> None:
        """Queue *report* for posting if it settled anything; never blocks, never raises."""
        if not self.urls or report.dry_run or not report.settled:
            return
        try:
            body = json.dumps({"event": "jobreaper.reap", "report": report.as_dict()}).encode()
            dropped = False
            with self._guard:
                if self._closed:
                    return
                if len(self._waiting) >= CAPACITY:
                    self._waiting.popleft()
                    dropped = True
                self._waiting.append(body)
                if self._running is None:
                    self._running = native.start_thread("jobreaper-webhooks", self._run)
            self._wake.ring()
            if dropped:
                logger.warning(
                    "jobreaper: %d webhook reports waiting; dropped the oldest", CAPACITY
                )
        except Exception:
            logger.exception("jobreaper: could not queue the report of run %s", report.run_id)

    def close(self, timeout: float | None = None) -> None:
        """Post what is queued (waiting at most *timeout* seconds; default: the longest one
        delivery may take, for each report waiting), then stop the thread."""
        with self._guard:
            self._closed = True
            running, waiting = self._running, len(self._waiting)
        if running is None:
            return
        self._wake.ring()
        if timeout is None:
            timeout = self.longest_delivery() * (waiting + 1)
        if not native.wait_released(running, timeout):
            logger.warning(
                "jobreaper: gave up waiting %g s for webhook reports still being posted", timeout
            )

    def longest_delivery(self) -> float:
        """Seconds one report may take to post to every URL, all retries included."""
        pauses = sum(self.first_pause * 2.0**i for i in range(self.retries))
        return len(self.urls) * (self.timeout * (self.retries + 1) + pauses)

    def _run(self) -> None:
        while True:
            with self._guard:
                body = self._waiting.popleft() if self._waiting else None
                closed = self._closed
            if body is None:
                if closed:
                    return
                self._wake.wait(60.0)
                continue
            for url in self.urls:
                try:
                    self._deliver(url, body)
                except Exception:  # the thread outlives any surprise
                    logger.exception("jobreaper: webhook %s failed", maybe_sanitize_url(url))

    def _deliver(self, url: str, body: bytes) -> None:
        shown = maybe_sanitize_url(url)
        pause = self.first_pause
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            why = self._post(url, body)
            if why is None:
                return
            retry, text = why
            if not retry or last:
                logger.error(
                    "jobreaper: webhook %s not delivered after %d tries: %s",
                    shown,
                    attempt + 1,
                    text,
                )
                return
            logger.warning("jobreaper: webhook %s: %s; retrying in %g s", shown, text, pause)
            time.sleep(pause)
            pause *= 2

    def _post(self, url: str, body: bytes) -> tuple[bool, str] | None:
        """``None`` when delivered, else (worth retrying, why not)."""
        # (imported here, in the posting thread: not every worker's start pays for it)
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read()
            return None
        except urllib.error.HTTPError as error:
            return error.code in RETRY_STATUSES, f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            return True, f"{type(reason).__name__}: {reason}"


def webhooks_for(settings: Settings) -> Webhooks | None:
    """The poster for ``jobreaper_webhooks`` (``None`` when no URL is configured)."""
    if not settings.webhooks:
        return None
    return Webhooks(
        settings.webhooks,
        timeout=settings.webhook_timeout,
        retries=settings.webhook_retries,
        headers=settings.webhook_headers,
    )
