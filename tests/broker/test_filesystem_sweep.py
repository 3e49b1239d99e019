"""kombu's filesystem transport: exact message files are deleted, everything else stays."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu
from celery import Celery

from celery_jobreaper.broker import task_id_of
from celery_jobreaper.broker.filesystem import sweep_queues

TASK = "proj.tasks.work"


def options(tmp_path: Path) -> dict[str, Any]:
    folder = tmp_path / "messages"
    (tmp_path / "control").mkdir(exist_ok=True)
    folder.mkdir(exist_ok=True)
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(tmp_path / "control"),
    }


def publish(app: Celery, queue: str, count: int) -> list[str]:
    ids = []
    with app.producer_or_acquire() as producer:
        for i in range(count):
            task_id = str(uuid.uuid4())
            app.send_task(TASK, args=(i,), queue=queue, task_id=task_id, producer=producer)
            ids.append(task_id)
    return ids


def consume_all(conn: kombu.Connection, queue: str) -> list[str | None]:
    """What a consumer gets from *queue*, in order."""
    channel: Any = conn.channel()
    out = []
    while (message := channel.basic_get(queue, no_ack=True)) is not None:
        out.append(task_id_of({"headers": message.headers, "properties": message.properties}))
    channel.close()
    return out


def files(folder: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in Path(folder).iterdir()}


def test_sweep_deletes_exactly_the_target_files(
    tmp_path: Path, make_app: Callable[..., Celery]
) -> None:
    """Targets removed; other messages, other queues and garbage files untouched."""
    opts = options(tmp_path)
    folder = opts["data_folder_in"]
    app = make_app("filesystem://", broker_transport_options=opts)
    ids = publish(app, "work", 60)
    other = publish(app, "other", 5)
    garbage = {
        "1_0000.work.msg": b"\x00 not json",
        "2_0001.work.msg": b'{"body": "x", "properties": {}}',
        "notes.txt": b"not a message file",
    }
    for name, data in garbage.items():
        (Path(folder) / name).write_bytes(data)
    targets = set(ids[::6]) | {other[0]}  # other[0] is in a queue that is not swept
    before = files(folder)

    result = sweep_queues(
        kombu.Connection("filesystem://", transport_options=opts), ["work"], targets.__contains__
    )

    assert sorted(task_id for task_id, _ in result.removed) == sorted(set(ids[::6]))
    assert {queue for _, queue in result.removed} == {"work"}
    assert result.unparsable == 2
    assert result.scanned == 62
    after = files(folder)
    assert set(before) - set(after) == {
        name for name, data in before.items() if task_id_of(data) in set(ids[::6])
    }
    assert all(after[name] == before[name] for name in after)
    for name in garbage:  # kombu's own consumer would choke on them
        (Path(folder) / name).unlink()
    with kombu.Connection("filesystem://", transport_options=opts) as conn:
        # kombu consumes in file name order (publish time in ms, then a random uuid).
        queued = [task_id_of(before[name]) for name in sorted(before) if name not in garbage]
        assert consume_all(conn, "work") == [i for i in queued if i in ids and i not in targets]
        assert sorted(consume_all(conn, "other")) == sorted(other)  # type: ignore[type-var]


def test_dry_run_deletes_nothing(tmp_path: Path, make_app: Callable[..., Celery]) -> None:
    opts = options(tmp_path)
    ids = publish(make_app("filesystem://", broker_transport_options=opts), "work", 10)
    before = files(opts["data_folder_in"])

    result = sweep_queues(
        kombu.Connection("filesystem://", transport_options=opts),
        ["work"],
        set(ids[:3]).__contains__,
        dry_run=True,
    )

    assert sorted(task_id for task_id, _ in result.removed) == sorted(ids[:3])
    assert files(opts["data_folder_in"]) == before


def test_a_file_consumed_under_the_sweep_is_not_an_error(
    tmp_path: Path, make_app: Callable[..., Celery]
) -> None:
    """A consumer takes the target between the sweep's read and its delete: no error."""
    opts = options(tmp_path)
    publish(make_app("filesystem://", broker_transport_options=opts), "work", 3)
    folder = files(opts["data_folder_in"])
    ids = [task_id_of(folder[name]) for name in sorted(folder)]  # consuming order
    taken: list[str | None] = []

    with kombu.Connection("filesystem://", transport_options=opts) as consumer:
        channel: Any = consumer.channel()

        def should_remove(task_id: str) -> bool:
            if task_id == ids[0]:  # the first file: the one a consumer takes next
                message = channel.basic_get("work", no_ack=True)
                taken.append(task_id_of({"headers": message.headers}))
                return True
            return task_id == ids[2]

        result = sweep_queues(
            kombu.Connection("filesystem://", transport_options=opts), ["work"], should_remove
        )
        channel.close()

        assert taken == [ids[0]]
        assert result.removed == [(ids[2], "work")]
        assert consume_all(consumer, "work") == [ids[1]]


def test_missing_folder_is_an_empty_sweep(tmp_path: Path) -> None:
    conn = kombu.Connection(
        "filesystem://", transport_options={"data_folder_in": str(tmp_path / "nowhere")}
    )
    assert sweep_queues(conn, ["work"], lambda _: True).scanned == 0
