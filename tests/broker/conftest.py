"""Fixtures for the broker sweep tests: real Redis and RabbitMQ, unique names, cleanup."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from support import AMQP_URL, REDIS_URL  # this test process's Redis (see support.py)


@pytest.fixture
def token() -> str:
    """A name part unique to the test; every Redis key the test makes contains it."""
    return f"jrb{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture
def rclient(token: str) -> Iterator[redis.Redis[Any]]:
    """A plain client on the test Redis; deletes every key containing the token afterwards."""
    client: redis.Redis[Any] = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as error:  # pragma: no cover - environment problem
        pytest.fail(f"Redis at {REDIS_URL} is needed for these tests: {error}")
    try:
        yield client
    finally:
        keys = list(client.scan_iter(match=f"*{token}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def make_app() -> Iterator[Callable[..., Celery]]:
    """Throwaway Celery apps (producers only), closed at teardown."""
    apps: list[Celery] = []

    def make(broker: str, **conf: Any) -> Celery:
        app = Celery(f"jrb-{uuid.uuid4().hex[:8]}", broker=broker, set_as_current=False)
        app.conf.update(conf)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
