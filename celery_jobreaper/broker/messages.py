"""Read the task id out of a raw kombu message, tolerating anything that is not one."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["fast_task_id", "task_id_of"]

# kombu's virtual transports (Redis, filesystem, ...) store a message as the JSON dump of
# ``{"body", "content-encoding", "content-type", "headers", "properties"}`` in that order, and
# Celery's protocol 2 puts ``lang``, ``task`` and ``id`` first in the headers. This pattern
# recognises exactly that prefix; it only accepts ``"id"`` as a key of the top-level
# ``headers`` object (the skipped members are plain scalars and never named "id"), and the
# captured value has no escapes, so the result equals what a full JSON parse would give.
_SKIPPED_MEMBER = r'"(?!id")[^"\\]*": (?:"[^"\\]*"|null|true|false|-?\d+(?:\.\d+)?), '
_PREFIX = (
    r'\{"body": "[^"\\]*", "content-encoding": (?:"[^"\\]*"|null), '
    r'"content-type": (?:"[^"\\]*"|null), "headers": \{(?:' + _SKIPPED_MEMBER + r")*"
    r'"id": "([^"\\]+)"'
)
_FAST_BYTES = re.compile(_PREFIX.encode("ascii"))
_FAST_STR = re.compile(_PREFIX)


def fast_task_id(raw: bytes | str) -> str | None:
    """The protocol 2 task id of *raw* if it has kombu's usual layout, else None.

    A cheap pre-check for bulk scans: a result is the id :func:`task_id_of` returns for
    a well-formed message; None only means "not recognised here", so call
    :func:`task_id_of` then. A message that is cut short after its headers' ``id`` is still
    recognised, so confirm with :func:`task_id_of` before acting on a match.
    """
    if isinstance(raw, str):
        found = _FAST_STR.match(raw)
        return found.group(1) if found else None
    match = _FAST_BYTES.match(raw)
    if match is None:
        return None
    try:
        return match.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _as_id(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and value:
        return value
    return None


def _load_json(raw: bytes | bytearray | str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def _protocol1_id(message: Mapping[str, Any]) -> str | None:
    """The ``id`` of a protocol 1 body (a JSON object holding ``task`` and ``id``)."""
    body = message.get("body")
    if not isinstance(body, (bytes, bytearray, str)) or not body:
        return None
    content_type = message.get("content-type", message.get("content_type"))
    if content_type is not None and not (
        isinstance(content_type, str) and content_type.endswith("json")
    ):
        return None
    properties = message.get("properties")
    if isinstance(properties, Mapping) and properties.get("body_encoding") == "base64":
        try:
            body = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return None
    decoded = _load_json(body)
    if isinstance(decoded, Mapping) and "task" in decoded:
        return _as_id(decoded.get("id"))
    return None


def task_id_of(raw: bytes | str | Mapping[str, Any]) -> str | None:
    """Task id of a kombu message payload, or None when it cannot be parsed.

    *raw* is the stored JSON (bytes or str) or the already decoded message mapping
    (``{"body", "content-type", "headers", "properties", ...}``). The id is
    ``headers["id"]`` (protocol 2), else the ``id`` of a JSON protocol 1 body, else
    ``properties["correlation_id"]``. None for anything else: not JSON, no ``headers``
    mapping, or a foreign producer's message carrying none of those.
    """
    message: Any = _load_json(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
    if not isinstance(message, Mapping):
        return None
    headers = message.get("headers")
    if not isinstance(headers, Mapping):
        return None
    task_id = _as_id(headers.get("id"))
    if task_id is not None:
        return task_id
    task_id = _protocol1_id(message)
    if task_id is not None:
        return task_id
    properties = message.get("properties")
    if isinstance(properties, Mapping):
        return _as_id(properties.get("correlation_id"))
    return None
