"""Real Redis and NATS servers for connector tests, started on free loopback ports.

A missing server binary skips the tests, except under ``CI=true``, where it fails
them: CI must run the connector tests against real servers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def find_binary(name: str) -> str:
    """The path of server binary ``name`` (PATH, then /usr/sbin and /usr/local/sbin)."""
    path = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/local/sbin") if os.access(p := f"{d}/{name}", os.X_OK)),
        None,
    )
    if path is None:
        why = f"{name} is not installed (scripts/setup.sh --full installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} in {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_redis(tmp: Path) -> Iterator[str]:
    """A redis-server without persistence; yields its URL."""
    binary = find_binary("redis-server")
    port = free_port()
    log = open(tmp / "redis.log", "wb")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)
        log.close()


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
