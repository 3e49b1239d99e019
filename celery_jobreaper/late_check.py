"""A run's check for late writes (:mod:`.late_writes`) to the rows it and other reapers
settled in user tables and result backends' tables: fenced like the run's other writes, a
failure logged once per distinct error and never failing the run, each found one counted in
the metrics."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import late_writes
from .lease import LeaseLost
from .schema import JobReaperTables
from .sources import JobSource, UserTableSource
from .sources.result_rows import ResultRowsSource
from .textsafe import safe

if TYPE_CHECKING:
    from .metrics import Metrics

#: The run's log lines keep the logger they have always had (the reaper's).
logger = logging.getLogger("celery_jobreaper.reaper")


def check_late_writes(
    conn: Any,
    sources: list[JobSource],
    tables: JobReaperTables,
    *,
    window: float,
    now: datetime,
    run_id: int | None,
    fence: Callable[[Any], object],
    last_error: str | None,
    sender: Any,
    metrics: Metrics | None,
) -> str | None:
    """Record late writes to rows of user tables and result backends' tables settled within
    *window* seconds before *now*; log and signal them (from *sender*).

    Returns the error the check failed with (logged only when it differs from *last_error*,
    the one the previous check returned), ``None`` when it ran; *last_error* when there was
    nothing to check. A lost lease is raised; any other failure never fails the reap."""
    user = [s for s in sources if isinstance(s, (UserTableSource, ResultRowsSource))]
    if not user or window <= 0:
        return last_error
    try:
        with conn.begin():
            fence(conn)
            found = late_writes.detect(conn, tables, user, now=now, window=window, run_id=run_id)
    except LeaseLost:
        raise
    except Exception as error:
        text = f"{type(error).__name__}: {error}"
        if text != last_error:
            logger.warning(
                "jobreaper: could not check settled user-table rows for late writes (%s)",
                safe(text.splitlines()[0]),
                exc_info=True,
            )
        return text
    late_writes.report(sender, found)
    if metrics is not None:
        for name, n in Counter(w.source for w in found).items():
            metrics.late_results(name, n)
    return None
