"""Tracked jobs: task signals write ``jobreaper_jobs`` with an owner incarnation and a fence.

One concept per module: :mod:`.records` (what a signal queues, in what order it is written),
:mod:`.writer` (the per-process batching writer thread), :mod:`.statements` (per-dialect SQL),
:mod:`.late` (late results), :mod:`.tracker` (the :class:`Tracker`), :mod:`.receivers` (the
Celery signal receivers, :func:`connect_signals`, :func:`set_tracker`); :mod:`.failures` (which
failed writes are retried) and :mod:`.process` (fork, threads, greenlets) serve the writer.
"""

from __future__ import annotations

from .late import LATE_RESULT
from .receivers import connect_signals, set_tracker
from .tracker import Tracker

__all__ = ["LATE_RESULT", "Tracker", "connect_signals", "set_tracker"]
