"""Remove exact messages from kombu's ``filesystem://`` transport.

kombu writes each message to its own file ``<ms>_<uuid4>.<queue>.msg`` in
``data_folder_out`` (holding an exclusive ``flock`` while writing), and consumers take the
oldest matching file of ``data_folder_in`` by moving it away. Removing a message is deleting
its file: unlinking is atomic, so either a consumer moved the file first (it is gone and
ours is a no-op) or the consumer's move fails and it skips to the next file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .messages import task_id_of
from .result import SweepResult

if TYPE_CHECKING:
    import kombu

__all__ = ["sweep_queues"]

logger = logging.getLogger(__name__)

if os.name == "posix":
    import fcntl

    def _read_locked(path: str) -> bytes:
        """Read *path* under a shared lock, so a message still being written is complete."""
        with open(path, "rb") as file:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH)
            try:
                return file.read()
            finally:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)

else:  # pragma: no cover - kombu locks with win32 APIs there; read without a lock

    def _read_locked(path: str) -> bytes:
        with open(path, "rb") as file:
            return file.read()


def _queue_of(filename: str) -> str | None:
    """The queue of a message file name (kombu's ``filename.partition('.')[2]`` rule)."""
    rest = filename.partition(".")[2]
    return rest[: -len(".msg")] if rest.endswith(".msg") else None


def sweep_queues(
    conn: kombu.Connection,
    queues: Sequence[str],
    should_remove: Callable[[str], bool],
    *,
    dry_run: bool = False,
) -> SweepResult:
    """Delete the message files of *queues* whose task id satisfies *should_remove*.

    Reads ``data_folder_in`` from the connection's transport options (kombu's default
    ``data_in``, relative to the working directory). A file that disappears before it is
    read or deleted was taken by a consumer and is skipped; an empty file is a message
    still being created and is skipped too. Files that are not task messages are counted in
    ``unparsable`` and left alone. *dry_run* deletes nothing.
    """
    options = conn.transport_options or {}
    folder = str(options.get("data_folder_in", "data_in"))
    result = SweepResult()
    wanted = set(queues)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        logger.warning("jobreaper: filesystem transport folder %r does not exist", folder)
        return result
    unparsable: dict[str, int] = {}
    for name in names:
        queue = _queue_of(name)
        if queue is None or queue not in wanted:
            continue
        path = os.path.join(folder, name)
        try:
            data = _read_locked(path)
        except FileNotFoundError:
            continue  # consumed meanwhile
        except IsADirectoryError:
            continue
        if not data:
            continue
        result.scanned += 1
        task_id = task_id_of(data)
        if task_id is None:
            unparsable[queue] = unparsable.get(queue, 0) + 1
            continue
        if not should_remove(task_id):
            continue
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                logger.debug("jobreaper: %s was consumed before it could be removed", task_id)
                continue
        result.removed.append((task_id, queue))
    for queue, count in sorted(unparsable.items()):
        result.unparsable += count
        logger.warning(
            "jobreaper: %d file(s) of queue %r in %r are not task messages we can read; "
            "left untouched",
            count,
            queue,
            folder,
        )
    if result.removed:
        logger.info(
            "jobreaper: %s %d message file(s) from %s",
            "would remove" if dry_run else "removed",
            len(result.removed),
            folder,
        )
    return result
