"""Pinging suspects: every reply of every node counts (DESIGN §2.1, two signals)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from celery import Celery
from support import REDIS_URL, WorkerProcess, wait_until, worker_env

from celery_jobreaper.ping import ping_with
from celery_jobreaper.reaper import ask_with


def test_ping_of_suspects_counts_every_reply_of_every_node(
    pg_url: str, unique: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A reply limit would make Celery stop collecting after that
    many replies, whoever sent them. Two processes answering to one suspect name (duplicate
    ``-n`` on another node name than this worker's: only *my* name is checked for
    duplicates), or any second reply, use up the limit, and another suspect's reply is
    dropped: that live suspect counts as silent, and with a stale heartbeat (database
    unreachable from it, heartbeat thread stuck) its running jobs are settled."""
    prefix, queue = f"jrp-{unique}:", f"q-{unique}"
    env = {**worker_env(pg_url, queue), "JR_KEYPREFIX": prefix}
    x, y = f"x-{unique}@h", f"y-{unique}@h"
    workers = [start_worker(x, env=env), start_worker(x, env=env), start_worker(y, env=env)]
    for w in workers:
        w.wait_for(r" ready\.", timeout=60)
    app = Celery("pinger", broker=REDIS_URL, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    ping = ping_with(app)
    answers = [ping([x, y], 3.0) for _ in range(6)]
    app.close()
    assert all(y in a for a in answers), answers


def test_ping_of_every_worker_hears_a_worker_nobody_named(
    pg_url: str, unique: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """``ping(None)`` asks every worker on the broker (one broadcast): a worker the table
    does not show as live (marked dead during a pause, not registered yet) answers too."""
    prefix, queue = f"jrb-{unique}:", f"q-{unique}"
    env = {**worker_env(pg_url, queue), "JR_KEYPREFIX": prefix}
    z = f"z-{unique}@h"
    start_worker(z, env=env).wait_for(r" ready\.", timeout=60)
    app = Celery("pinger", broker=REDIS_URL, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    answers = ping_with(app)(None, 1.0)
    app.close()
    assert z in answers, answers


def test_ask_counts_the_held_reply_of_either_process_with_one_name(
    pg_url: str, unique: str, tmp_path: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Two processes answer to one node name; one runs task T, the other is idle. Asking that
    name whether T is held must say yes every time: replies are not merged by node name."""
    prefix = f"jrq-{unique}:"
    x = f"x-{unique}@h"
    busy = start_worker(x, env={**worker_env(pg_url, f"qa-{unique}"), "JR_KEYPREFIX": prefix})
    idle = start_worker(x, env={**worker_env(pg_url, f"qb-{unique}"), "JR_KEYPREFIX": prefix})
    for w in (busy, idle):
        w.wait_for(r" ready\.", timeout=60)
    app = Celery("asker", broker=REDIS_URL, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    task = app.send_task("jr.sleep", args=(60,), kwargs={"tag": "held"}, queue=f"qa-{unique}")
    wait_until((tmp_path / "started-held").exists, 60, "the task to start")
    ask = ask_with(app)
    answers = [ask([x], [task.id], 1.0) for _ in range(4)]
    app.close()
    assert all(task.id in a for a in answers), answers
