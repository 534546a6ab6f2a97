"""Real Redis and NATS servers for connector tests, started on free loopback ports.

A missing server binary skips the tests, except under ``CI=true``, where it fails
them: CI must run the connector tests against real servers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotwire.testing import servers


def find_binary(name: str) -> str:
    """The path of server binary ``name`` (see :func:`hotwire.testing.servers.find_binary`);
    a missing one skips the test, or fails it under ``CI=true``."""
    try:
        return servers.find_binary(name)
    except servers.ServerMissing as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {e}")
        pytest.skip(str(e))
    raise AssertionError("unreachable")


def run_redis(tmp: Path) -> Iterator[str]:
    """A redis-server without persistence (:func:`hotwire.testing.servers.redis_server`);
    yields its URL."""
    find_binary("redis-server")
    with servers.redis_server(tmp) as url:
        yield url


def run_nats(tmp: Path) -> Iterator[str]:
    """A nats-server with JetStream storing in ``tmp`` (:func:`hotwire.testing.servers.
    nats_server`); yields its URL."""
    find_binary("nats-server")
    with servers.nats_server(tmp) as url:
        yield url


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a redis-server of this test alone, stopped at its end."""
    yield from run_redis(tmp_path)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a nats-server with JetStream of this test alone, stopped at its end."""
    yield from run_nats(tmp_path)
