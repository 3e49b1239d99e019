"""Asking live peers which tasks they hold (before settling a job whose task id they may run)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from .broadcast import broadcast
from .ping import ALL_REPLIES
from .textsafe import safe

#: ``ask(nodes, task_ids, timeout)`` -> task ids active/reserved/scheduled on those nodes.
TaskAsker = Callable[[Collection[str], Collection[str], float], set[str]]


class PeersUnsure(RuntimeError):
    """A live peer answered but could not tell (an error: jobreaper not installed there)."""


def ask_with(app: Any) -> TaskAsker:
    """A :data:`TaskAsker`: which of *task_ids* the live workers *nodes* hold.

    Sends jobreaper's own ``jobreaper_held`` command (:mod:`.broker.holders`) to exactly
    *nodes*, not Celery's ``query_task``: that one sees neither a rate-limited request waiting
    in a token bucket nor (before Celery 5.7) an ETA request waiting on the timer. A node
    that answers with an error (a worker without jobreaper installed, which cannot see those
    requests either) or incompletely makes the answer "don't know": :class:`PeersUnsure` is
    raised and the caller leaves those jobs alone this time. A node that does not answer
    within *timeout* is taken to hold none of them, as before: a worker still starting
    (registered, its startup reap not done, not consuming yet) cannot answer and holds
    nothing, and counting it as "don't know" would keep every reap near a starting peer
    from settling jobs with a task id (a busy ``-P solo`` peer cannot answer either).

    Every reply counts: replies are collected until none came for *timeout* seconds
    (:data:`ALL_REPLIES`), and read raw, not through ``inspect()``, whose replies are merged
    by node name: of two processes answering to one name, the later reply would hide a live
    peer's "I hold it" (or its failure to answer).
    """
    from .broker.holders import HELD_COMMAND

    def ask(nodes: Collection[str], task_ids: Collection[str], timeout: float) -> set[str]:
        if not nodes or not task_ids:
            return set()
        replies = broadcast(
            app,
            HELD_COMMAND,
            arguments={"tags": [], "ids": list(task_ids)},
            destination=nodes,
            reply=True,
            timeout=timeout,
            limit=ALL_REPLIES,
        )
        held: set[str] = set()
        answered: set[str] = set()
        unsure: set[str] = set()
        for reply in replies:
            for node, body in (reply or {}).items():
                if isinstance(body, dict) and body.get("complete") is True:
                    answered.add(node)
                    held.update(str(i) for i in body.get("ids") or ())
                else:
                    unsure.add(node)
        if unsure:
            raise PeersUnsure(
                "no complete answer from "
                + ", ".join(safe(n) for n in sorted(unsure))
                + " (jobreaper not installed there?)"
            )
        return held

    return ask
