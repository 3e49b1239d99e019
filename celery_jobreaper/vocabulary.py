"""The words jobreaper writes to its own tables and reports, defined once.

Plain strings (stored as they are): job statuses of ``jobreaper_jobs``, incarnation states
of ``jobreaper_incarnations``, ledger actions of ``jobreaper_events`` and run triggers of
``jobreaper_runs``. User tables keep their own statuses (``stale_statuses``,
``failed_status``).
"""

from __future__ import annotations

from typing import Final

# -- job statuses (jobreaper_jobs.status) ------------------------------------------------------

#: A task is running the job (also an incarnation state: see below).
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
RETRY: Final = "retry"
REVOKED: Final = "revoked"
JOB_STATUSES: Final = (RUNNING, SUCCEEDED, FAILED, RETRY, REVOKED)

# -- incarnation states (jobreaper_incarnations.state) -----------------------------------------

# RUNNING (above): started and heartbeating.
#: Warm shutdown: no reaping any more, tasks still finishing, still heartbeating.
DRAINING: Final = "draining"
#: Stopped cleanly.
STOPPED: Final = "stopped"
#: Judged dead by a reaper (two signals: no heartbeat and no ping reply).
DEAD: Final = "dead"
INCARNATION_STATES: Final = (RUNNING, DRAINING, STOPPED, DEAD)
#: States of an incarnation that may still be running tasks.
LIVE_STATES: Final = (RUNNING, DRAINING)

# -- ledger actions (jobreaper_events.action) --------------------------------------------------

#: A job settled as failed.
SETTLED: Final = "settled"
#: A task finished after its job had been settled (the late result is not applied).
LATE_RESULT: Final = "late_result"
#: A user-table row changed after jobreaper settled it (the application's own write, which
#: jobreaper cannot fence: detected by a later reap, see :mod:`celery_jobreaper.late_writes`).
LATE_WRITE: Final = "late_write"
#: A revoked or settled job's message removed from a queue.
REMOVED: Final = "removed"
#: A message a dead worker took but never acknowledged, put back in its queue.
RESTORED: Final = "restored"
#: A message a dead worker took but never acknowledged, dropped (its task revoked or settled).
DROPPED: Final = "dropped"
#: This worker's queues purged (``jobreaper_queue_cleanup = "purge"``).
PURGED: Final = "purged"
LEDGER_ACTIONS: Final = (SETTLED, LATE_RESULT, LATE_WRITE, REMOVED, RESTORED, DROPPED, PURGED)

# -- run triggers (jobreaper_runs.trigger) -----------------------------------------------------

#: The reap a worker runs before its consumer starts.
STARTUP: Final = "startup"
#: The cluster's reap every ``jobreaper_interval`` seconds, by the worker holding the
#: maintenance lease (see :mod:`celery_jobreaper.lease`).
PERIODIC: Final = "periodic"
#: A reap from any other process (``celery_jobreaper.reap``, the CLI).
MANUAL: Final = "manual"
#: A worker's own reap outside the leader's cycle: after one of its pool processes died, or
#: its startup reap retried (the database was down at start).
LOCAL: Final = "local"
#: A reap a worker ran when asked by remote control (``control jobreaper_reap``).
REMOTE: Final = "remote"
TRIGGERS: Final = (STARTUP, PERIODIC, MANUAL, LOCAL, REMOTE)

# -- why a job was settled (metrics' ``cause`` label; a few fixed words, never a node name) -----

#: Its owner (incarnation or node name) was judged dead: stale heartbeat and no ping reply.
OWNER_DEAD: Final = "owner_dead"
#: Owned by an earlier start of this worker's node name (dead by definition).
EARLIER_START: Final = "earlier_start"
#: Its owner never registered with jobreaper, did not answer a ping, and the job is old.
OWNER_NEVER_REGISTERED: Final = "owner_never_registered"
#: Older than ``jobreaper_max_age``.
MAX_AGE: Final = "max_age"
#: A job without owner, and no worker at all could be running it.
NO_LIVE_WORKER: Final = "no_live_worker"
#: A job of this worker whose task it no longer holds (its pool process died).
POOL_PROCESS_LOST_CAUSE: Final = "pool_process_lost"
#: A job of this worker without task id while this worker holds no task.
OWN_JOB_NOT_RUNNING: Final = "own_job_not_running"
CAUSES: Final = (
    OWNER_DEAD,
    EARLIER_START,
    OWNER_NEVER_REGISTERED,
    MAX_AGE,
    NO_LIVE_WORKER,
    POOL_PROCESS_LOST_CAUSE,
    OWN_JOB_NOT_RUNNING,
)
