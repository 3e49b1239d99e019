"""Text from the database or a message, made safe to put in a log line.

Job ids, task ids, kinds, owner names and error texts come from rows and message headers that
anyone able to write a job or send a task controls. Logged raw, a newline forges a second log
line and an ANSI escape repaints the operator's terminal. :func:`safe` keeps printable text as
it is and writes every other character as a Python escape (``\\n``, ``\\x1b``, ``\\u2028``), so
one value stays on one line and looks like what it is.
"""

from __future__ import annotations

from typing import Any


def safe(value: Any) -> str:
    """``str(value)`` with control and other non-printable characters escaped.

    Printable text (the usual case) is returned unchanged and without copying. ``None`` gives
    ``'None'``, as ``%s`` would.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
