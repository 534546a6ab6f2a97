"""Real Redis and NATS servers for connector tests, started on free loopback ports.

A missing server binary skips the tests, except under ``CI=true``, where it fails
them: CI must run the connector tests against real servers.
"""

from __future__ import annotations

import os
import subprocess
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


def free_port() -> int:
    return servers.free_port()


_wait_port = servers._wait_port
_stop = servers._stop


def run_redis(tmp: Path) -> Iterator[str]:
    """A redis-server without persistence (:func:`hotwire.testing.servers.redis_server`);
    yields its URL."""
    find_binary("redis-server")
    with servers.redis_server(tmp) as url:
        yield url


def run_nats(tmp: Path) -> Iterator[str]:
    """A nats-server with JetStream storing in ``tmp``; yields its URL."""
    binary = find_binary("nats-server")
    port = free_port()
    store = tmp / "jetstream"
    store.mkdir(exist_ok=True)
    log = open(tmp / "nats.log", "wb")
    proc = subprocess.Popen(
        [binary, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(port, proc, "nats-server")
        yield f"nats://127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a redis-server of this test alone, stopped at its end."""
    yield from run_redis(tmp_path)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a nats-server with JetStream of this test alone, stopped at its end."""
    yield from run_nats(tmp_path)
