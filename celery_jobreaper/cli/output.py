"""Aligned tables and short ages for a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import click

from ..textsafe import safe


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    width: int = 60,
    err: bool = False,
) -> None:
    """Print *rows* under *headers*, columns aligned; cells longer than *width* are cut."""
    if not rows:
        click.echo("  (none)", err=err)
        return
    cells = [[_cell(v, width) for v in row] for row in rows]
    sizes = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    for line in lines:
        click.echo(
            "  " + "  ".join(v.ljust(sizes[i]) for i, v in enumerate(line)).rstrip(), err=err
        )


def _cell(value: object, width: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    text = safe(str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def age(since: datetime | None, now: datetime) -> str:
    """``since`` as an age on *now*'s clock: ``4s``, ``12m 3s``, ``5h 2m``, ``3d 4h``."""
    if since is None:
        return "-"
    seconds = int((now - since) / timedelta(seconds=1))
    if seconds < 0:
        return f"in {-seconds}s"
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {s}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {m}m"
    days, h = divmod(hours, 24)
    return f"{days}d {h}h"
