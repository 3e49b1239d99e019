"""Failed tracking writes: which are worth retrying, and how one is named in a log line."""

from __future__ import annotations

from sqlalchemy import exc


def _transient(error: BaseException) -> bool:
    """Whether a failed write may work when tried again (connection trouble, lock conflicts)."""
    if isinstance(error, exc.DBAPIError):
        return bool(error.connection_invalidated) or isinstance(
            error, exc.OperationalError | exc.InterfaceError
        )
    return isinstance(error, exc.TimeoutError | exc.DisconnectionError | OSError)


def _summary(error: BaseException) -> str:
    """``Type: first line of the message``, short enough for one log line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
