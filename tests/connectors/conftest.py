"""Real servers for connector tests, started by fixtures and stopped at the end.

A missing server binary skips the tests that need it, except under ``CI=true``,
where it fails them: CI must run the connector tests against real servers.
Append further server fixtures at the end of this file.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _missing(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {why}")
    pytest.skip(why)


def postgres_bin(name: str) -> str:
    """``initdb``, ``pg_ctl`` or ``postgres``: on PATH, else Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # newest first
        if os.access(p := os.path.join(d, name), os.X_OK):
            return p
    _missing(f"PostgreSQL's {name} is not installed (scripts/setup.sh --full installs it)")
    raise AssertionError("unreachable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server (initdb into a temp dir, TCP on 127.0.0.1, trust auth,
    ``max_prepared_transactions=10``); yields the URL of its ``postgres`` database."""
    initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
    # PostgreSQL refuses to run as root: as root, run it as the postgres (or nobody)
    # user in a directory of its own outside root's private pytest directory.
    user = None
    if os.geteuid() == 0:
        user = "postgres" if _has_user("postgres") else "nobody"
        base = Path(tempfile.mkdtemp(prefix="hotwire-pg-"))
        shutil.chown(base, user)
    else:
        base = tmp_path_factory.mktemp("pg")
    data = base / "data"
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"],
        check=True,
        capture_output=True,
        user=user,
        cwd=base,
    )
    port = _free_port()
    log = open(base / "postgres.log", "wb")
    proc = subprocess.Popen(
        [
            postgres,
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(base),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_prepared_transactions=10",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=50",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        user=user,
        cwd=base,
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        _wait_ready(url, proc, base / "postgres.log")
        yield url
    finally:
        proc.terminate()  # SIGTERM: smart shutdown; SIGINT would be fast
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        if user is not None:
            shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
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


@pytest.fixture
def pg_url(postgres_server: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the session's server for one test; dropped afterwards."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        for (gid,) in conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = %s", (name,)
        ).fetchall():
            # A prepared transaction keeps its database in use; release it first.
            with psycopg.connect(
                postgres_server.rsplit("/", 1)[0] + "/" + name, autocommit=True
            ) as c2:
                c2.execute(f"ROLLBACK PREPARED '{gid}'")
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
