"""Shared fixtures: real local clusters (master + workers as processes) and app files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hotwire.testing.cluster import LocalCluster


@pytest.fixture(autouse=True)
def _own_profiles(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each test reads and writes client profiles in a home of its own. With the user's
    home, a profile that ``streamctl up`` left for one port made a later plaintext
    cluster on that port unreachable (the client dialled it with TLS)."""
    monkeypatch.setenv("HOTWIRE_HOME", str(tmp_path_factory.mktemp("hotwire-home")))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A master and two workers as real processes on loopback port 0; stopped afterwards."""
    c = LocalCluster(workers=2, data_dir=tmp_path / "cluster", heartbeat_timeout=3.0)
    c.start()
    try:
        yield c
    finally:
        failed = [
            p.label
            for p in [c.master, *c.workers]
            if p is not None and p.proc.poll() not in (None, 0, -15)
        ]
        c.stop()
        assert not failed, f"processes died during the test: {failed}\n{c.logs()}"
