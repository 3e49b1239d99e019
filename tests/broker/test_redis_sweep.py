"""Redis transport: selective removal from queue lists and settling of ``unacked`` entries."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import kombu
import pytest
import redis
from celery import Celery
from kombu.transport.redis import Mutex

from celery_jobreaper.broker import SweepResult, task_id_of
from celery_jobreaper.broker.messages import fast_task_id
from celery_jobreaper.broker.redis import (
    _REMOVE_LUA,
    queue_keys,
    settings_from_connection,
    sweep_queues,
    sweep_unacked,
)

TASK = "proj.tasks.work"

GARBAGE = [
    b"\xff\xfe not json at all",  # not JSON, not even UTF-8
    b'{"foo": 1, "bar": [1, 2, 3]}',  # JSON without headers
    b"[1, 2, 3]",  # JSON, not an object
    json.dumps(  # a foreign producer: headers without an id, opaque body
        {"body": "aGVsbG8=", "headers": {"x-source": "billing"}, "properties": {}}
    ).encode(),
    b"",
]


def publish(
    app: Celery, queue: str, count: int, *, priorities: bool = True, **extra: Any
) -> list[str]:
    """Send *count* real task messages to *queue*; return their ids in publish order."""
    ids = []
    with app.producer_or_acquire() as producer:
        for i in range(count):
            task_id = str(uuid.uuid4())
            app.send_task(
                TASK,
                args=(i,),
                kwargs={"n": i},
                queue=queue,
                priority=i % 10 if priorities else None,
                task_id=task_id,
                producer=producer,
                **extra,
            )
            ids.append(task_id)
    return ids


def snapshot(client: redis.Redis[Any], queue: str, **kwargs: Any) -> dict[str, list[bytes]]:
    return {key: client.lrange(key, 0, -1) for key in queue_keys(queue, **kwargs)}


def ids_in(entries: list[bytes]) -> list[str | None]:
    return [task_id_of(entry) for entry in entries]


# --- messages ------------------------------------------------------------------------------


def test_task_id_of_reads_protocol_2_protocol_1_and_rejects_garbage(
    rclient: redis.Redis[Any], token: str, redis_url: str, make_app: Callable[..., Celery]
) -> None:
    """Both Celery protocols parse (fast path agrees with the full parse); garbage is None."""
    queue = f"q-{token}"
    (id2,) = publish(make_app(redis_url), queue, 1, priorities=False)
    (id1,) = publish(make_app(redis_url, task_protocol=1), queue, 1, priorities=False)
    newest, oldest = rclient.lrange(queue, 0, -1)
    assert task_id_of(oldest) == id2
    assert fast_task_id(oldest) == id2
    assert task_id_of(oldest.decode()) == id2
    assert task_id_of(json.loads(oldest)) == id2
    assert task_id_of(newest) == id1  # protocol 1: the id is inside the base64 body
    assert fast_task_id(newest) is None
    for garbage in GARBAGE:
        assert task_id_of(garbage) is None
        assert fast_task_id(garbage) is None
    # Fallback: no headers id and no protocol 1 body, but a correlation id.
    assert task_id_of({"headers": {}, "properties": {"correlation_id": "abc"}}) == "abc"
    assert task_id_of({"properties": {"correlation_id": "abc"}}) is None  # no headers


def test_queue_keys_and_settings_follow_kombu(redis_url: str, token: str) -> None:
    """Key names equal kombu's ``_q_for_pri``; settings carry transport options and defaults."""
    options = {"priority_steps": [0, 4, 8], "global_keyprefix": f"{token}:", "sep": ":"}
    with kombu.Connection(redis_url, transport_options=options) as conn:
        channel: Any = conn.default_channel
        expected = [options["global_keyprefix"] + channel._q_for_pri("q", p) for p in (0, 4, 8)]
        settings = settings_from_connection(conn)
    assert queue_keys("q", priority_steps=(0, 4, 8), sep=":", global_keyprefix=f"{token}:") == (
        expected
    )
    assert queue_keys("q") == ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
    assert settings == {
        "global_keyprefix": f"{token}:",
        "priority_steps": (0, 4, 8),
        "sep": ":",
        "unacked_key": "unacked",
        "unacked_index_key": "unacked_index",
        "unacked_mutex_key": "unacked_mutex",
        "unacked_mutex_expire": 300,
        "visibility_timeout": 3600.0,
    }


# --- queue lists ---------------------------------------------------------------------------


def test_sweep_removes_exactly_the_targets_and_keeps_order(
    rclient: redis.Redis[Any], token: str, redis_url: str, make_app: Callable[..., Celery]
) -> None:
    """10,000 messages over all priority lists, 100 targeted: exactly those go, order stays.

    Malformed entries spread over the lists survive byte for byte and are counted.
    """
    queue = f"q-{token}"
    app = make_app(redis_url)
    ids = publish(app, queue, 5_000)
    keys = queue_keys(queue)
    rng = random.Random(7)
    for garbage in GARBAGE:  # in the middle of the lists, between real messages
        rclient.lpush(rng.choice(keys), garbage)
    ids += publish(app, queue, 5_000)
    before = snapshot(rclient, queue)
    assert all(len(entries) > 1_000 for entries in before.values())  # every list used
    targets = set(rng.sample(ids, 100))

    result = sweep_queues(rclient, [queue], targets.__contains__, chunk=1_000)

    after = snapshot(rclient, queue)
    for key in keys:
        expected = [entry for entry in before[key] if task_id_of(entry) not in targets]
        assert after[key] == expected
    assert sorted(task_id for task_id, _ in result.removed) == sorted(targets)
    assert Counter(key for _, key in result.removed) == Counter(
        key for key in keys for entry in before[key] if task_id_of(entry) in targets
    )
    assert result.unparsable == len(GARBAGE)
    assert result.scanned == 10_000 + len(GARBAGE)
    assert not result.restored
    assert not result.dropped_unacked
    assert not result.partial


def test_dry_run_reports_and_changes_nothing(
    rclient: redis.Redis[Any], token: str, redis_url: str, make_app: Callable[..., Celery]
) -> None:
    queue = f"q-{token}"
    ids = publish(make_app(redis_url), queue, 500)
    rclient.lpush(queue, GARBAGE[0])
    before = snapshot(rclient, queue)
    targets = set(ids[::50])

    result = sweep_queues(rclient, [queue], targets.__contains__, chunk=64, dry_run=True)

    assert snapshot(rclient, queue) == before
    assert sorted(task_id for task_id, _ in result.removed) == sorted(targets)
    assert result.unparsable == 1
    assert result.scanned == 501


def test_sweep_honours_global_keyprefix_and_priority_steps(
    rclient: redis.Redis[Any], token: str, redis_url: str, make_app: Callable[..., Celery]
) -> None:
    """Keys written by kombu under a global key prefix and custom steps are swept."""
    options = {"global_keyprefix": f"{token}:", "priority_steps": [0, 5]}
    queue = f"q-{token}"
    ids = publish(make_app(redis_url, broker_transport_options=options), queue, 200)
    with kombu.Connection(redis_url, transport_options=options) as conn:
        settings = settings_from_connection(conn)
    layout = {k: settings[k] for k in ("priority_steps", "sep", "global_keyprefix")}
    keys = queue_keys(queue, **layout)
    assert keys == [f"{token}:{queue}", f"{token}:{queue}\x06\x165"]
    assert sum(rclient.llen(key) for key in keys) == 200
    targets = set(ids[:10])

    result = sweep_queues(rclient, [queue], targets.__contains__, **layout)

    assert {task_id for task_id, _ in result.removed} == targets
    remaining = [task_id_of(e) for key in keys for e in rclient.lrange(key, 0, -1)]
    assert sorted(remaining) == sorted(set(ids) - targets)  # type: ignore[type-var]


def test_prefixing_or_decoding_clients_are_refused(redis_url: str) -> None:
    with (
        redis.Redis.from_url(redis_url, decode_responses=True) as decoding,
        pytest.raises(TypeError),
    ):
        sweep_queues(decoding, ["q"], lambda _: True)
    with kombu.Connection(redis_url, transport_options={"global_keyprefix": "p:"}) as conn:
        prefixing: Any = conn.default_channel.client  # type: ignore[attr-defined]
        with pytest.raises(TypeError):
            sweep_queues(prefixing, ["q"], lambda _: True)


@pytest.mark.parametrize(
    "load",
    [(10, 10, 100), (5, 40, 50), (1, 100, 30)],
    ids=["steady", "consumers-faster", "consumers-overtake"],
)
def test_sweep_is_exact_while_workers_push_and_pop_the_same_list(
    rclient: redis.Redis[Any],
    token: str,
    redis_url: str,
    make_app: Callable[..., Celery],
    load: tuple[int, int, int],
) -> None:
    """A producer LPUSHes and a consumer RPOPs the list all through the sweep.

    Afterwards: no target is left, each target went exactly once (removed by the sweep or
    popped by the consumer first), and survivors + popped, in order, are the original
    messages + the pushed ones minus exactly the removed ones: nothing lost, nothing
    duplicated, order kept. With consumers faster than the sweep, its position marker gets
    consumed and it must find its place again or restart at the tail.
    """
    push, pop, chunk = load  # messages pushed and popped per round trip; sweep chunk size
    queue = f"q-{token}"
    app = make_app(redis_url)
    ids = publish(app, queue, 6_000, priorities=False)
    staging = f"staging-{token}"
    publish(app, staging, 3_000, priorities=False)
    to_push = rclient.lrange(staging, 0, -1)[::-1]  # oldest first
    rclient.delete(staging)
    original = rclient.lrange(queue, 0, -1)
    targets = set(random.Random(3).sample(ids, 300))

    pushed: list[bytes] = []
    popped: list[bytes] = []
    started = threading.Event()
    stop = threading.Event()
    other = redis.Redis.from_url(redis_url)

    def live_worker() -> None:
        for start in range(0, len(to_push), push):
            if stop.is_set():
                break
            batch = to_push[start : start + push]
            pipe = other.pipeline(transaction=False)
            for message in batch:
                pipe.lpush(queue, message)
            for _ in range(pop):
                pipe.rpop(queue)
            replies = pipe.execute()
            pushed.extend(batch)
            popped.extend(item for item in replies[len(batch) :] if item is not None)
            started.set()
        started.set()

    thread = threading.Thread(target=live_worker)
    thread.start()
    try:
        started.wait()
        result = sweep_queues(rclient, [queue], targets.__contains__, chunk=chunk)
    finally:
        stop.set()
        thread.join()
        other.close()

    final = rclient.lrange(queue, 0, -1)
    removed_ids = [task_id for task_id, _ in result.removed]
    popped_ids = {task_id_of(m) for m in popped}
    assert not targets & {task_id_of(m) for m in final}
    assert len(removed_ids) == len(set(removed_ids))
    assert set(removed_ids) <= targets
    assert set(removed_ids) | (targets & popped_ids) == targets
    assert not set(removed_ids) & popped_ids
    removed = set(removed_ids)
    expected = [m for m in pushed[::-1] + original if task_id_of(m) not in removed]
    assert final + popped[::-1] == expected
    assert popped
    assert pushed


def test_removal_script_checks_values_and_follows_moved_entries(
    rclient: redis.Redis[Any], token: str
) -> None:
    """The Lua step alone: exact hit, entry moved a little or a lot, entry gone."""
    key = f"list-{token}"
    values = [f"m{i}".encode() for i in range(5_000)]
    rclient.rpush(key, *values)  # head m0 ... tail m4999
    script = rclient.register_script(_REMOVE_LUA)
    tomb = f"tomb-{token}"

    def index(i: int) -> int:  # index from the tail of values[i] as it was written
        return i - len(values)

    # Hints: exact, 3 too far from the tail (window), 2,000 off (LPOS), and a missing value.
    args: list[Any] = [tomb, 64, 0, 10_000, 1_000_000]
    args += [index(10), values[10], b""]
    args += [index(20) - 3, values[20], b""]
    args += [index(4_000) + 2_000, values[4_000], b""]
    args += [index(4_500), b"not there", b""]
    reply = script(keys=[key], args=args)

    assert [int(flag) for flag in reply[4:]] == [1, 1, 1, 0]
    assert rclient.lrange(key, 0, -1) == [
        v for i, v in enumerate(values) if i not in (10, 20, 4_000)
    ]


# --- unacked -------------------------------------------------------------------------------


class Unacked:
    """Real ``unacked`` entries made by kombu itself, under keys unique to the test."""

    def __init__(self, client: redis.Redis[Any], redis_url: str, token: str, **options: Any):
        self.client = client
        self.url = redis_url
        self.options = {
            "unacked_key": f"unacked-{token}",
            "unacked_index_key": f"unacked_index-{token}",
            "unacked_mutex_key": f"unacked_mutex-{token}",
            **options,
        }
        self.prefix = self.options.get("global_keyprefix", "")
        self.hash = self.prefix + self.options["unacked_key"]
        self.index = self.prefix + self.options["unacked_index_key"]

    def take_without_ack(self, queue: kombu.Queue, count: int) -> dict[str, str]:
        """A consumer takes *count* messages and dies without acking; task id -> tag."""
        taken: dict[str, str] = {}
        with kombu.Connection(self.url, transport_options=self.options) as conn:
            channel: Any = conn.channel()
            channel.qos.restore_at_shutdown = False  # a killed worker restores nothing
            bound = queue.bind(channel)
            for _ in range(count):
                message = bound.get(no_ack=False)
                assert message is not None
                taken[message.headers["id"]] = str(message.delivery_tag)
            channel.close()
        return taken

    def age(self, tag: str, seconds: float) -> None:
        self.client.zadd(self.index, {tag: time.time() - seconds}, xx=True)

    def entries(self) -> dict[bytes, bytes]:
        return self.client.hgetall(self.hash)

    def index_tags(self) -> set[bytes]:
        return set(self.client.zrange(self.index, 0, -1))

    def sweep(self, **kwargs: Any) -> SweepResult:
        with kombu.Connection(self.url, transport_options=self.options) as conn:
            settings = settings_from_connection(conn)
        settings.pop("visibility_timeout")
        return sweep_unacked(self.client, **settings, **kwargs)

    def kombu_restore(self, tag: str, raw: bytes, score: float, declare: kombu.Queue) -> None:
        """Put the entry back and let kombu's own ``restore_by_tag`` restore it."""
        self.client.hset(self.hash, tag, raw)
        self.client.zadd(self.index, {tag: score})
        with kombu.Connection(self.url, transport_options=self.options) as conn:
            channel: Any = conn.channel()
            declare.bind(channel).declare()  # a worker's channel knows its exchanges
            channel.qos.restore_by_tag(tag)
            channel.close()


def test_unacked_drop_restore_live_and_young(
    rclient: redis.Redis[Any], token: str, redis_url: str, make_app: Callable[..., Celery]
) -> None:
    """Old entries of dead tasks are dropped or restored; live and young ones stay.

    The restored message is byte for byte what kombu's ``restore_by_tag`` pushes, on the
    same priority list, at the tail (consumed next).
    """
    unacked = Unacked(rclient, redis_url, token)
    queue_name = f"q-{token}"
    app = make_app(redis_url, broker_transport_options=unacked.options)
    publish(app, queue_name, 10)  # priorities 0..9
    taken = unacked.take_without_ack(kombu.Queue(queue_name), 5)
    assert len(unacked.entries()) == 5
    drop_id, restore_id, live_id, young_id, unparsable_id = taken
    for task_id in (drop_id, restore_id, live_id, unparsable_id):
        unacked.age(taken[task_id], 1_000)
    bad_tag = taken[unparsable_id]
    rclient.hset(unacked.hash, bad_tag, b'["not", "a message"]')
    before = unacked.entries()
    score = rclient.zscore(unacked.index, taken[restore_id])
    assert score is not None
    queue_before = snapshot(rclient, queue_name)

    result = unacked.sweep(
        is_live={live_id}.__contains__, should_drop={drop_id}.__contains__, grace=100
    )

    assert result.dropped_unacked == [(drop_id, taken[drop_id])]
    priority = json.loads(before[taken[restore_id].encode()])[0]["properties"]["priority"]
    with kombu.Connection(redis_url) as conn:
        restore_key = conn.default_channel._q_for_pri(queue_name, priority)  # type: ignore[attr-defined]
    assert result.restored == [(restore_id, restore_key)]
    assert result.unparsable == 1
    assert result.scanned == 4  # the young one is not even looked at
    left = unacked.entries()
    assert set(left) == {taken[t].encode() for t in (live_id, young_id, unparsable_id)}
    assert all(left[tag] == before[tag] for tag in left)
    assert unacked.index_tags() == set(left)
    after = snapshot(rclient, queue_name)
    for key, entries in after.items():
        if key == restore_key:
            assert entries[:-1] == queue_before[key]
            restored = entries[-1]
        else:
            assert entries == queue_before[key]
    message = json.loads(restored)
    assert message["headers"]["id"] == restore_id
    assert message["headers"]["redelivered"] is True
    assert message["properties"]["delivery_info"]["redelivered"] is True

    rclient.rpop(restore_key)
    unacked.kombu_restore(
        taken[restore_id], before[taken[restore_id].encode()], score, kombu.Queue(queue_name)
    )
    assert rclient.lrange(restore_key, -1, -1) == [restored]


def test_unacked_restore_resolves_exchange_bindings_like_kombu(
    rclient: redis.Redis[Any], token: str, redis_url: str
) -> None:
    """Messages sent through a direct and a topic exchange go back to their bound queues."""
    unacked = Unacked(rclient, redis_url, token)
    direct = kombu.Exchange(f"direct-{token}", "direct")
    topic = kombu.Exchange(f"topic-{token}", "topic")
    q_direct = kombu.Queue(f"qd-{token}", direct, routing_key=f"rk-{token}")
    q_topic = kombu.Queue(f"qt-{token}", topic, routing_key="jobs.*.high")
    with kombu.Connection(redis_url, transport_options=unacked.options) as conn:
        producer = conn.Producer()
        for queue, key in ((q_direct, f"rk-{token}"), (q_topic, "jobs.eu.high")):
            queue.bind(conn.default_channel).declare()
            producer.publish(
                {"x": 1},
                exchange=queue.exchange,
                routing_key=key,
                headers={"id": f"id-{queue.name}", "task": TASK},
                priority=4,
            )
    taken = unacked.take_without_ack(q_direct, 1) | unacked.take_without_ack(q_topic, 1)
    before = unacked.entries()
    scores = {tag: rclient.zscore(unacked.index, tag) for tag in taken.values()}
    for tag in taken.values():
        unacked.age(tag, 1_000)

    result = unacked.sweep(is_live=lambda _: False, should_drop=lambda _: False, grace=100)

    assert sorted(result.restored) == [
        (f"id-{q_direct.name}", f"{q_direct.name}\x06\x163"),
        (f"id-{q_topic.name}", f"{q_topic.name}\x06\x163"),
    ]
    assert not unacked.entries()
    ours = {key: rclient.lrange(key, 0, -1) for _, key in result.restored}
    for (task_id, key), queue in zip(sorted(result.restored), (q_direct, q_topic), strict=True):
        assert len(ours[key]) == 1
        rclient.delete(key)
        tag = taken[task_id]
        score = scores[tag]
        assert score is not None
        unacked.kombu_restore(tag, before[tag.encode()], score, queue)
        assert rclient.lrange(key, 0, -1) == ours[key]


def test_unacked_sweep_is_a_no_op_while_the_mutex_is_held(
    rclient: redis.Redis[Any], token: str, redis_url: str, make_app: Callable[..., Celery]
) -> None:
    unacked = Unacked(rclient, redis_url, token)
    queue_name = f"q-{token}"
    publish(make_app(redis_url, broker_transport_options=unacked.options), queue_name, 3)
    taken = unacked.take_without_ack(kombu.Queue(queue_name), 3)
    for tag in taken.values():
        unacked.age(tag, 1_000)
    before = unacked.entries(), snapshot(rclient, queue_name)

    with Mutex(rclient, unacked.options["unacked_mutex_key"], 60):
        result = unacked.sweep(is_live=lambda _: False, should_drop=lambda _: True, grace=10)

    assert result == SweepResult()
    assert (unacked.entries(), snapshot(rclient, queue_name)) == before
    # Once released, the same call does its work.
    result = unacked.sweep(is_live=lambda _: False, should_drop=lambda _: True, grace=10)
    assert sorted(result.dropped_unacked) == sorted(taken.items())
    assert not unacked.entries()
    assert not unacked.index_tags()


def test_unacked_dry_run_and_global_keyprefix(
    rclient: redis.Redis[Any], token: str, redis_url: str, make_app: Callable[..., Celery]
) -> None:
    """Under a global key prefix; a dry run reports and changes nothing, a real run acts."""
    unacked = Unacked(rclient, redis_url, token, global_keyprefix=f"{token}:")
    queue_name = f"q-{token}"
    publish(make_app(redis_url, broker_transport_options=unacked.options), queue_name, 4)
    taken = unacked.take_without_ack(kombu.Queue(queue_name), 4)
    assert rclient.hlen(f"{token}:unacked-{token}") == 4
    for tag in taken.values():
        unacked.age(tag, 1_000)
    drop = set(list(taken)[:2])
    before = unacked.entries(), snapshot(rclient, queue_name, global_keyprefix=f"{token}:")

    dry = unacked.sweep(
        is_live=lambda _: False, should_drop=drop.__contains__, grace=10, dry_run=True
    )

    assert (unacked.entries(), snapshot(rclient, queue_name, global_keyprefix=f"{token}:")) == (
        before
    )
    real = unacked.sweep(is_live=lambda _: False, should_drop=drop.__contains__, grace=10)
    assert dry == real
    assert {task_id for task_id, _ in real.dropped_unacked} == drop
    assert {task_id for task_id, _ in real.restored} == set(taken) - drop
    assert all(key.startswith(f"{token}:{queue_name}") for _, key in real.restored)
    assert not unacked.entries()


def test_unacked_entry_without_a_bound_queue_is_kept(
    rclient: redis.Redis[Any], token: str, redis_url: str
) -> None:
    """kombu would drop a message it cannot route back; the sweep leaves it and counts it."""
    unacked = Unacked(rclient, redis_url, token)
    exchange = kombu.Exchange(f"direct-{token}", "direct")
    queue = kombu.Queue(f"qd-{token}", exchange, routing_key=f"rk-{token}")
    with kombu.Connection(redis_url, transport_options=unacked.options) as conn:
        queue.bind(conn.default_channel).declare()
        conn.Producer().publish(
            {"x": 1}, exchange=exchange, routing_key=f"rk-{token}", headers={"id": "t1"}
        )
    taken = unacked.take_without_ack(queue, 1)
    unacked.age(taken["t1"], 1_000)
    rclient.delete(f"_kombu.binding.{exchange.name}")  # the queue's binding is gone
    before = unacked.entries()

    result = unacked.sweep(is_live=lambda _: False, should_drop=lambda _: False, grace=10)

    assert result.unparsable == 1
    assert not result.restored
    assert unacked.entries() == before
