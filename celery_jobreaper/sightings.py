"""When this reaper first saw each job whose start is unknown, on the database's clock.

A job without owner whose ``started_at`` is ``NULL`` (a ``scheduled`` job of the seed's table)
or whose table has no ``started_at`` column cannot be aged by its start. The "no live worker"
rule ages it instead by how long a reaper has seen it: a worker woken from a pause may have
written it just before its first heartbeat, and it heartbeats within its interval, so a job
seen for longer than ``jobreaper_heartbeat_timeout`` with still no live worker was written
before the silence was measured (:class:`~celery_jobreaper.rules.OwnerlessRule`).

One store per :class:`~celery_jobreaper.reaper.Reaper`, in memory: a new process starts with
none, so it fails no such job at its first sight. The times are the run's ``now`` (the
database's clock, read when the run judged liveness, before it read the rows): a sighting is
recorded at most that run's length too early, far less than the ``heartbeat_timeout -
heartbeat_interval`` the rule has to spare. Entries not noted during a whole run are forgotten
at its end (the job finished, was settled, or got a start), so the store holds no more than the
rows a run sees; a run that stops early (a worker that does not lead stops before reading
any row) forgets rows it did not reach, which only delays them. The job id is the row's
identity: a row that leaves the stale statuses and is back under the same id by the next run
keeps its first sighting (a limit: ids are not reused for new jobs in the usual tables).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any


class Sightings:
    """First sightings of jobs whose start is unknown: source name -> job id -> first seen."""

    def __init__(self) -> None:
        self._first: dict[str, dict[Any, datetime]] = {}
        #: keys noted since the last :meth:`end_run` (source name -> job ids)
        self._noted: dict[str, set[Any]] = {}
        self._lock = threading.Lock()

    def note(self, source: str, job_ids: Iterable[Any], now: datetime) -> Mapping[Any, datetime]:
        """Record *job_ids* of *source* as seen at *now* (naive UTC, database time); a job seen
        before keeps its earlier time. Returns job id -> first seen for *job_ids*."""
        with self._lock:
            first = self._first.setdefault(source, {})
            noted = self._noted.setdefault(source, set())
            out: dict[Any, datetime] = {}
            for job_id in job_ids:
                seen = first.get(job_id)
                if seen is None or now < seen:
                    seen = first[job_id] = now
                noted.add(job_id)
                out[job_id] = seen
            return MappingProxyType(out)

    def first_seen(self, source: str) -> Mapping[Any, datetime]:
        """Every job of *source* remembered now: job id -> first seen (a copy)."""
        with self._lock:
            return MappingProxyType(dict(self._first.get(source, {})))

    def end_run(self) -> None:
        """At the end of a run: forget every job not noted since the previous end."""
        with self._lock:
            self._first = {
                source: kept
                for source, first in self._first.items()
                if (kept := {k: t for k, t in first.items() if k in self._noted.get(source, ())})
            }
            self._noted = {}

    def __len__(self) -> int:
        with self._lock:
            return sum(len(first) for first in self._first.values())
