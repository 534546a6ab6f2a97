"""Real redis-server, nats-server and PostgreSQL servers on free ports, for tests and
benchmarks.

Each is a context manager that starts the server in a directory of its own and
stops it (and waits for it) on exit::

    with redis_server(tmp) as url, postgres_server(tmp) as pg_url:
        ...

A missing server binary raises :class:`ServerMissing` naming it and how to
install it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "Restartable",
    "ServerMissing",
    "durable_redis",
    "free_port",
    "nats_server",
    "postgres_server",
    "redis_server",
    "restartable_postgres",
]


class ServerMissing(RuntimeError):
    """A server binary is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    """The path of ``name``: PATH, /usr/sbin, /usr/local/sbin, then PostgreSQL's
    Debian directories /usr/lib/postgresql/*/bin (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    dirs = ["/usr/sbin", "/usr/local/sbin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"))[::-1]]
    for d in dirs:
        if os.access(p := os.path.join(d, name), os.X_OK):
            return p
    msg = f"{name} is not installed (scripts/setup.sh --full installs it)"
    raise ServerMissing(msg)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_port(
    port: int,
    proc: subprocess.Popen[bytes],
    what: str,
    host: str = "127.0.0.1",
    timeout: float = 10,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} in {timeout}s")


class Restartable:
    """A server process a test stops and starts again on the same port and data
    (``args`` run as ``user`` when given), its output appended to ``log``."""

    def __init__(self, args: list[str], log: Path, port: int, user: str | None = None):
        self.args, self.log, self.port, self.user = args, log, port, user
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, user=self.user
            )
        _wait_port(self.port, self.proc, os.path.basename(self.args[0]), timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        p.send_signal(sig)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@contextlib.contextmanager
def redis_server(tmp: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """A redis-server without persistence listening on ``host``, its log in ``tmp``;
    yields its URL."""
    binary = find_binary("redis-server")
    port = free_port()
    with open(tmp / "redis.log", "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                host,
                "--protected-mode",
                "yes" if host == "127.0.0.1" else "no",
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
            _wait_port(port, proc, "redis-server", host)
            yield f"redis://{host}:{port}/0"
        finally:
            _stop(proc)


@contextlib.contextmanager
def nats_server(tmp: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """A nats-server with JetStream storing in ``tmp/jetstream``, listening on
    ``host``, its log in ``tmp/nats.log``; yields its URL."""
    binary = find_binary("nats-server")
    port = free_port()
    store = tmp / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    with open(tmp / "nats.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, "-js", "-sd", str(store), "-a", host, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_port(port, proc, "nats-server", host)
            yield f"nats://{host}:{port}"
        finally:
            _stop(proc)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def durable_redis(tmp: Path) -> Iterator[tuple[str, Restartable]]:
    """A redis-server that writes every change to its append-only file before it
    replies (``appendfsync always``), so a SIGKILL loses nothing it acknowledged;
    its data in ``tmp/redis``, its log in ``tmp/redis.log``. Yields its URL and the
    :class:`Restartable` that kills and starts it again on the same port and data."""
    binary = find_binary("redis-server")
    port = free_port()
    data = tmp / "redis"
    data.mkdir(parents=True, exist_ok=True)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    server = Restartable(args, tmp / "redis.log", port)
    server.start()
    try:
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        server.stop()


def _initdb(tmp: Path, settings: dict[str, str] | None) -> tuple[Path, list[str], str | None]:
    """A new PostgreSQL data directory (as the postgres or nobody user when root) and
    the arguments that run a server on it on a free port: (base dir, args, user)."""
    initdb, postgres = find_binary("initdb"), find_binary("postgres")
    user = None
    if os.geteuid() == 0:
        user = "postgres" if _has_user("postgres") else "nobody"
    base = Path(tempfile.mkdtemp(prefix="hotwire-pg-", dir=None if user else tmp))
    if user is not None:
        shutil.chown(base, user)
    data = base / "data"
    try:
        subprocess.run(
            [initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
            user=user,
            cwd=base,
        )
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    conf = {
        "listen_addresses": "127.0.0.1",
        "max_prepared_transactions": "10",
        "fsync": "off",
        "max_connections": "50",
        **(settings or {}),
    }
    args = [postgres, "-D", str(data), "-p", str(free_port()), "-k", str(base)]
    for k, v in conf.items():
        args += ["-c", f"{k}={v}"]
    return base, args, user


@contextlib.contextmanager
def restartable_postgres(
    tmp: Path, settings: dict[str, str] | None = None
) -> Iterator[tuple[str, Restartable]]:
    """A PostgreSQL server as :func:`postgres_server` starts it, its log in
    ``tmp/postgres.log``; yields the URL of its ``postgres`` database and the
    :class:`Restartable` that stops it (``stop(signal.SIGQUIT)``: an immediate
    shutdown, crash recovery at the next start) and starts it again on the same
    port and data."""
    base, args, user = _initdb(tmp, settings)
    port = int(args[args.index("-p") + 1])
    server = Restartable(args, tmp / "postgres.log", port, user)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        server.start()
        proc = server.proc
        assert proc is not None
        _wait_postgres(url, proc, tmp / "postgres.log")
        yield url, server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(tmp: Path, settings: dict[str, str] | None = None) -> Iterator[str]:
    """A PostgreSQL server (initdb into a new directory, TCP on 127.0.0.1, trust auth,
    ``max_prepared_transactions=10``, ``fsync=off`` plus ``settings``); yields the URL
    of its ``postgres`` database. As root it runs as the postgres (or nobody) user
    in a directory of its own (PostgreSQL refuses to run as root)."""
    base, args, user = _initdb(tmp, settings)
    port = args[args.index("-p") + 1]
    try:
        with open(base / "postgres.log", "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, user=user, cwd=base)
            url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            try:
                _wait_postgres(url, proc, base / "postgres.log")
                yield url
            finally:
                _stop(proc)  # SIGTERM: smart shutdown
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait_postgres(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            psycopg.connect(url, connect_timeout=1).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def prometheus_server(tmp: Path, scrape_configs: str) -> Iterator[str]:
    """A real Prometheus server (Debian's ``prometheus``) with ``scrape_configs``
    (YAML, the list under ``scrape_configs:``), scraping every second; yields its
    URL and stops it afterwards. Raises :class:`ServerMissing` if it is not installed."""
    import urllib.request

    binary = find_binary("prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n{scrape_configs}"
    )
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {proc.returncode}:\n" + log.read_text()[-2000:]
                )
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as r:
                    if bytes(r.read()).startswith(b"Prometheus"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("prometheus was not ready within 30 s")
            time.sleep(0.1)
        yield url
    finally:
        _stop(proc)


def promql(url: str, query: str) -> list[Any]:
    """The result vector of an instant PromQL ``query`` against a Prometheus at ``url``."""
    import json
    import urllib.parse
    import urllib.request

    q = urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=5) as r:
        doc = json.loads(r.read())
    if doc.get("status") != "success":
        raise RuntimeError(f"PromQL {query!r} failed: {doc}")
    return list(doc["data"]["result"])
