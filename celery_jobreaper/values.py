"""Checks shared by the settings: each returns the value or raises ConfigurationError naming
the key."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from celery.utils.time import maybe_timedelta

from .errors import ConfigurationError


def flag(key: str, value: Any) -> bool:
    """A boolean setting (also "true"/"false", "1"/"0", "yes"/"no", "on"/"off")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(key, f"expected true or false, got {value!r}")


def flag_or_auto(key: str, value: Any) -> bool | Literal["auto"]:
    """A switch that may also be ``"auto"`` (on when the configuration calls for it)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return flag(key, value)
    except ConfigurationError:
        raise ConfigurationError(key, f"expected 'auto', true or false, got {value!r}") from None


def seconds(key: str, value: Any, default: float, *, positive: bool = False) -> float:
    """A duration setting in seconds (a number, numeric text or a ``timedelta``)."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise ConfigurationError(key, f"expected a number of seconds, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigurationError(key, f"expected a number of seconds, got {value!r}") from None
    if not isinstance(value, (int, float, timedelta)):
        raise ConfigurationError(key, f"expected a number of seconds, got {value!r}")
    total = float(cast(Any, maybe_timedelta)(value).total_seconds())
    if math.isnan(total) or math.isinf(total) or total < 0 or (positive and total == 0):
        need = "a positive" if positive else "a non-negative"
        raise ConfigurationError(key, f"expected {need} number of seconds, got {value!r}")
    return total


def optional_seconds(key: str, value: Any) -> float | None:
    """A duration setting in seconds, or ``None`` (off)."""
    return None if value is None else seconds(key, value, 0.0, positive=True)


def positive_int(key: str, value: Any) -> int:
    """A positive integer setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(key, f"expected a positive integer, got {value!r}")
    return value


def count(key: str, value: Any) -> int:
    """A non-negative integer setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(key, f"expected a non-negative integer, got {value!r}")
    return value


def urls(key: str, value: Any) -> tuple[str, ...]:
    """One ``http(s)://`` URL or a list of them."""
    urls = (value,) if isinstance(value, str) else value
    if not isinstance(urls, (list, tuple)):
        raise ConfigurationError(key, f"expected a URL or a list of URLs, got {value!r}")
    for url in urls:
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise ConfigurationError(key, f"expected http:// or https:// URLs, got {url!r}")
    return tuple(urls)


def headers(key: str, value: Any) -> dict[str, str]:
    """A mapping of HTTP header names to string values."""
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigurationError(
            key, f"expected a mapping of header names to strings, got {value!r}"
        )
    return dict(value)


def choice(key: str, value: Any, choices: Sequence[str]) -> str:
    """One of *choices*."""
    if value not in choices:
        raise ConfigurationError(key, f"expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def globs(key: str, value: Any) -> tuple[str, ...]:
    """A glob or a list of globs (task names, job kinds)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(key, "expected a list of task-name globs")
    return tuple(value)
