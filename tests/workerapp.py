"""A Celery app for tests that start real ``celery worker`` subprocesses; configured by env vars.

JR_BROKER_URL, JR_DATABASE_URL, JR_SETTINGS (JSON of extra ``jobreaper_*`` keys without the
prefix), JR_QUEUE (queue name), JR_SIGNAL_DIR (tasks touch files there to show progress),
JR_SLOW_POOL_DETECTION ("1": Celery's prefork pool notices a dead pool process only when told,
see :func:`_slow_pool_detection`), JR_HUB_BLOCKER ("1": the file ``block-hub`` in JR_SIGNAL_DIR
blocks the worker's event loop while it exists, see :class:`HubBlocker`), JR_RESULT_BACKEND
(Celery's ``result_backend``, with ``task_track_started`` on).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps

import celery_jobreaper
from celery_jobreaper import signals as jr_signals

app = Celery("workerapp", broker=os.environ.get("JR_BROKER_URL", "memory://"))
app.conf.update(
    task_default_queue=os.environ.get("JR_QUEUE", "celery"),
    worker_hijack_root_logger=True,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=int(os.environ.get("JR_PREFETCH", "1")),
    task_acks_late=os.environ.get("JR_ACKS_LATE") == "1",
    jobreaper_database_url=os.environ.get("JR_DATABASE_URL"),
    jobreaper_heartbeat_interval=1,
    jobreaper_heartbeat_timeout=3,
    jobreaper_interval=1,
    jobreaper_ping_timeout=0.5,
)
if os.environ.get("JR_RESULT_BACKEND"):
    app.conf.result_backend = os.environ["JR_RESULT_BACKEND"]
    app.conf.task_track_started = True
if os.environ.get("JR_KEYPREFIX"):  # isolates Redis keys (queues, unacked) per test
    app.conf.broker_transport_options = {"global_keyprefix": os.environ["JR_KEYPREFIX"]}
for key, value in json.loads(os.environ.get("JR_SETTINGS", "{}")).items():
    app.conf[f"jobreaper_{key}"] = value
if os.environ.get("JR_NO_INSTALL") != "1":
    celery_jobreaper.install(app)


@jr_signals.reap_finished.connect(weak=False)
def _reaped(sender: Any = None, report: Any = None, **_: Any) -> None:
    """Every finished reap, idle periodic ones included (they write no runs row), one line in
    ``reaps.log`` of JR_SIGNAL_DIR: ``<trigger> <pid>``."""
    folder = os.environ.get("JR_SIGNAL_DIR")
    if folder and report is not None:
        with Path(folder, "reaps.log").open("a") as log:
            log.write(f"{report.trigger} {os.getpid()}\n")


def _mark(name: str) -> None:
    folder = os.environ.get("JR_SIGNAL_DIR")
    if folder:
        Path(folder, name).write_text(str(os.getpid()))
        with Path(folder, "marks.log").open("a") as log:  # every start and end, in order
            log.write(f"{name} {os.getpid()}\n")


@app.task(name="jr.sleep", bind=True)
def sleep(self: Any, seconds: float, tag: str = "") -> str:
    """Sleep, announcing the start (and the end) through files in JR_SIGNAL_DIR."""
    _mark(f"started-{tag or self.request.id}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    _mark(f"finished-{tag or self.request.id}")
    return tag


@app.task(name="jr.spin", bind=True)
def spin(self: Any, job_id: str) -> str:
    """A user job (as ``jr.job``) that keeps the CPU busy and never yields (no I/O, no sleep)
    until the file ``release-<job_id>`` appears in JR_SIGNAL_DIR (checked with ``os.stat``,
    which no green library patches)."""
    from datetime import datetime, timezone

    from sqlalchemy import insert, update

    engine, table = _jobs_table()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    values: dict[str, Any] = {
        "job_id": job_id,
        "job_type": "library_scan",
        "status": "running",
        "started_at": now,
        "owner": self.request.hostname,
        "task_id": self.request.id,
    }
    with engine.begin() as conn:
        conn.execute(insert(table).values(**values))
    _mark(f"started-{job_id}")
    release = Path(os.environ["JR_SIGNAL_DIR"], f"release-{job_id}")
    spins = 0
    while not release.exists():
        for _ in range(10_000):  # pure CPU between two checks
            spins += 1
    with engine.begin() as conn:
        conn.execute(
            update(table)
            .where(table.c.job_id == job_id, table.c.status == "running")
            .values(
                status="completed", completed_at=datetime.now(timezone.utc).replace(tzinfo=None)
            )
        )
    _mark(f"finished-{job_id}")
    return job_id


_record_clients: dict[int, Any] = {}


@app.task(name="jr.record")
def record(value: str) -> None:
    """Append *value* to the Redis list named by JR_RECORD_KEY (execution order).

    One client per process, kept (tests run thousands of these: a connection each took a
    large part of their time)."""
    import redis

    client = _record_clients.get(os.getpid())
    if client is None:
        client = _record_clients[os.getpid()] = redis.Redis.from_url(os.environ["JR_RECORD_URL"])
    client.rpush(os.environ["JR_RECORD_KEY"], value)


@app.task(name="jr.noop")
def noop() -> None:
    """Do nothing (throughput benchmarks)."""


_engines: dict[int, Any] = {}


def _jobs_table() -> tuple[Any, Any]:
    """This process's engine on JR_DATABASE_URL and its ``system_jobs`` table (reflected)."""
    from sqlalchemy import MetaData, Table, create_engine

    made = _engines.get(os.getpid())
    if made is None:
        engine = create_engine(os.environ["JR_DATABASE_URL"])
        table = Table("system_jobs", MetaData(), autoload_with=engine)
        made = _engines[os.getpid()] = (engine, table)
    return made


@app.task(name="jr.job", bind=True)
def job(self: Any, job_id: str, seconds: float, fenced: bool = True) -> str:
    """A user job in the seed's ``system_jobs`` table: written running, then completed.

    *fenced*: the completion UPDATE only changes a row still ``running`` (a row jobreaper
    settled meanwhile is kept); unfenced, it overwrites whatever the row holds.

    Writes the owner / task id columns when the table has them (``owner`` is this worker's
    node name, as ``task.request.hostname``), and announces its pool process's pid in
    ``started-<job_id>`` under JR_SIGNAL_DIR.
    """
    return _run_job(self.request, job_id, seconds, fenced)


def _run_job(request: Any, job_id: str, seconds: float, fenced: bool = True) -> str:
    from datetime import datetime, timezone

    from sqlalchemy import insert, update

    engine, table = _jobs_table()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    values: dict[str, Any] = {
        "job_id": job_id,
        "job_type": "library_scan",
        "status": "running",
        "started_at": now,
    }
    if "owner" in table.c:
        values["owner"] = request.hostname
    if "task_id" in table.c:
        values["task_id"] = request.id
    with engine.begin() as conn:
        conn.execute(insert(table).values(**values))
    _mark(f"started-{job_id}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    where = [table.c.job_id == job_id]
    if fenced:
        where.append(table.c.status == "running")
    with engine.begin() as conn:
        conn.execute(
            update(table)
            .where(*where)
            .values(
                status="completed", completed_at=datetime.now(timezone.utc).replace(tzinfo=None)
            )
        )
    _mark(f"finished-{job_id}")
    return job_id


def _skew_clock(seconds: float) -> None:
    """Make this worker's host clock look *seconds* off (JR_CLOCK_SKEW): every
    ``celery_jobreaper`` module's ``utcnow`` is replaced (tests only)."""
    import sys
    from datetime import timedelta

    from celery_jobreaper import clock

    real = clock.utcnow

    def skewed() -> Any:
        return real() + timedelta(seconds=seconds)

    for name, module in list(sys.modules.items()):
        if name.startswith("celery_jobreaper") and getattr(module, "utcnow", None) is real:
            module.utcnow = skewed  # type: ignore[attr-defined]


if os.environ.get("JR_CLOCK_SKEW"):
    import celery_jobreaper.reaper  # load the modules whose clock is replaced
    import celery_jobreaper.step

    _skew_clock(float(os.environ["JR_CLOCK_SKEW"]))


@app.task(name="jr.limited", rate_limit="1/m")
def limited(tag: str) -> None:
    """A rate-limited task (one a minute): a second one waits in the worker's token bucket."""
    _mark(f"finished-{tag}")


def _slow_pool_detection() -> None:
    """Make Celery's own notice of a dead pool process as late as it can be (tests only).

    Celery's prefork pool learns of a dead child in two ways: the child's sentinel pipe becomes
    readable (``AsynPool._event_process_exit``, which calls ``maintain_pool``), and a
    ``maintain_pool`` timer every 5 s. The pipe is closed while the kernel tears the child
    down, often before the child can be waited for; ``maintain_pool`` then finds nothing, the
    sentinel is no longer watched, and only the timer notices (celery/celery#9588). Here the
    sentinel handler always loses that race and the timer runs once an hour, so a pool process
    death is noticed only when something else calls ``maintain_pool``.
    """
    from celery.concurrency import asynpool

    def exit_seen_too_early(self: Any, hub: Any, proc: Any) -> None:
        self._untrack_child_process(proc, hub)  # what a lost race amounts to

    asynpool.AsynPool._event_process_exit = exit_seen_too_early
    asynpool.AsynPool.timers = property(lambda self: {self.maintain_pool: 3600.0})


if os.environ.get("JR_SLOW_POOL_DETECTION") == "1":
    _slow_pool_detection()


def _die_once_result_sent() -> None:
    """In a pool process: SIGKILL this process once its current task's result was sent.

    Billiard's work loop (``billiard.pool.Worker.workloop``) counts ``completed`` right after it
    wrote a task's result to the main process's pipe; a thread waits for that count to grow,
    so the result is in the pipe, unread if the main process is stopped, when the child dies.
    """
    import signal
    import sys
    import threading

    main = threading.main_thread().ident

    def workloop_completed() -> int | None:
        frame = sys._current_frames().get(main) if main is not None else None
        while frame is not None:
            if frame.f_code.co_name == "workloop" and "billiard" in frame.f_code.co_filename:
                return int(frame.f_locals["completed"])
            frame = frame.f_back
        return None

    before = workloop_completed()
    assert before is not None, "not in a billiard pool process"

    def watch() -> None:
        while (workloop_completed() or 0) <= before:
            time.sleep(0.001)
        _mark("result-sent")
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


@app.task(name="jr.finish_then_die", bind=True)
def finish_then_die(self: Any, job_id: str) -> str:
    """A user job that completes once the file ``go-<job_id>`` exists; its pool process then
    dies right after sending the result (:func:`_die_once_result_sent`)."""
    folder = os.environ["JR_SIGNAL_DIR"]
    _run_job(
        self.request, job_id, 0
    )  # writes the row running, then completed, and the started-/finished- marks
    while not Path(folder, f"go-{job_id}").exists():
        time.sleep(0.02)
    _die_once_result_sent()
    return job_id


class HubBlocker(bootsteps.StartStopStep):
    """Blocks the worker's event loop (its thread only) while ``block-hub`` exists (tests only).

    Every 20 ms, on the loop, look for the file; while it exists write ``hub-blocked`` and
    sleep: the main process's other threads (jobreaper's) run on, its event loop does not.
    """

    def register_with_event_loop(self, worker: Any, hub: Any) -> None:
        """Look for the file every 20 ms, on the event loop."""
        folder = Path(os.environ["JR_SIGNAL_DIR"])

        def check() -> None:
            if (folder / "block-hub").exists():
                (folder / "hub-blocked").write_text("")
                while (folder / "block-hub").exists():
                    time.sleep(0.01)

        hub.call_repeatedly(0.02, check)


if os.environ.get("JR_HUB_BLOCKER") == "1":
    app.steps["worker"].add(HubBlocker)


if os.environ.get("JR_DEBUG_DUMP") or os.environ.get("JR_LOCK_AUDIT"):
    import greendiag  # diagnosis of gevent workers only (see its docstring)

    greendiag.install()
