"""Real servers for connector tests, started by fixtures and stopped at the end.

A missing server binary skips the tests that need it, except under ``CI=true``,
where it fails them: CI must run the connector tests against real servers.
Append further server fixtures at the end of this file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from hotwire.testing import servers


def _missing(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {why}")
    pytest.skip(why)


def postgres_bin(name: str) -> str:
    """``initdb``, ``pg_ctl`` or ``postgres``: on PATH, else Debian's /usr/lib/postgresql/*/bin."""
    try:
        return servers.find_binary(name)
    except servers.ServerMissing:
        _missing(f"PostgreSQL's {name} is not installed (scripts/setup.sh --full installs it)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server (:func:`hotwire.testing.servers.postgres_server`: initdb into
    a temp dir, TCP on 127.0.0.1, trust auth, ``max_prepared_transactions=10``); yields
    the URL of its ``postgres`` database."""
    for name in ("initdb", "postgres"):
        postgres_bin(name)  # missing: skip, or fail under CI
    with servers.postgres_server(tmp_path_factory.mktemp("pg")) as url:
        yield url


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
