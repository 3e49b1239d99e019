"""Asking workers to reap, and waiting for their reports (``celery jobreaper reap --on``).

``control jobreaper_reap`` replies at once that the reap was queued (the worker runs it in a
thread of its own, not on its consumer). Given where to report (this process's reply queue and a
ticket), each worker then sends its report there as a second reply. This module sends the
request and collects both replies of each worker, until every worker that accepted has reported
or the deadline passes.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
import uuid
from collections.abc import Collection
from typing import Any

from kombu import Consumer

#: Seconds to wait for the workers' answers to the ping that finds them (``--on all``).
PING_TIMEOUT = 1.0


def requester() -> str:
    """Who asks, as the worker logs it: ``user@host (pid N)``."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


def jobreaper_nodes(app: Any, timeout: float = PING_TIMEOUT) -> list[str]:
    """Node names of the workers that reap with jobreaper and answer a ping within *timeout* s."""
    replies = app.control.broadcast("jobreaper_ping", reply=True, timeout=timeout) or []
    return sorted(
        node
        for reply in replies
        for node, answer in reply.items()
        if isinstance(answer, dict) and answer.get("reaps")
    )


def reap_on(
    app: Any,
    nodes: Collection[str] | None = None,
    *,
    dry_run: bool = False,
    timeout: float = 60.0,
) -> dict[str, dict[str, Any]]:
    """Have each of *nodes* (default: every jobreaper worker that answers a ping) reap now.

    Returns ``node -> answer``: ``{"report": {...}}`` once its report came, ``{"error": ...}``
    when it refused or its reap failed before reporting, ``{"ok": "reap requested", ...}`` when
    it accepted but did not report within *timeout* seconds, and nothing for a node that never
    answered.
    """
    targets = sorted(nodes) if nodes is not None else jobreaper_nodes(app)
    if not targets:
        return {}
    ticket = uuid.uuid4().hex
    answers: dict[str, dict[str, Any]] = {}
    reported: set[str] = set()
    with app.connection_for_write() as conn:
        mailbox = app.control.mailbox(conn)
        channel = conn.default_channel
        arguments = {
            "dry_run": dry_run,
            "requester": requester(),
            "reply_to": {"exchange": mailbox.reply_exchange.name, "routing_key": mailbox.oid},
            "ticket": ticket,
        }

        def on_reply(body: Any, message: Any) -> None:
            if message.headers.get("ticket") != ticket or not isinstance(body, dict):
                return
            for node, answer in body.items():
                if node not in targets or not isinstance(answer, dict):
                    continue
                if node in reported:
                    continue
                if "report" in answer or "error" in answer:
                    reported.add(node)
                answers[node] = answer

        consumer = Consumer(channel, [mailbox.reply_queue], accept=["json"], no_ack=True)
        consumer.register_callback(on_reply)
        try:
            with consumer:
                mailbox._publish(
                    "jobreaper_reap",
                    arguments,
                    destination=targets,
                    reply_ticket=ticket,
                    channel=channel,
                    timeout=timeout,
                )
                deadline = time.monotonic() + timeout
                while len(reported) < len(targets):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        conn.drain_events(timeout=min(left, 1.0))
                    except TimeoutError:
                        continue
        finally:
            channel.after_reply_message_received(mailbox.reply_queue.name)
    return answers
