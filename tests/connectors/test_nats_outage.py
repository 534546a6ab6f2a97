"""A nats-server killed and restarted mid-run (same port, same JetStream store): the
JetStream source and sink wait for it (status says so), reconnect, and every
message is counted and published exactly once, with nothing left unacknowledged."""

from __future__ import annotations

import os
import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nats import _app, _Js

from hotwire.testing.cluster import LocalCluster, poll_for
from hotwire.testing.servers import Restartable, ServerMissing, find_binary, free_port

N = 4000


class _Nats(Restartable):
    """A nats-server with JetStream storing in ``tmp``, restartable on its store."""

    def __init__(self, tmp: Path) -> None:
        port = free_port()
        store = tmp / "jetstream"
        store.mkdir()
        args = [find_binary("nats-server"), "-js", "-sd", str(store), "-a", "127.0.0.1"]
        super().__init__([*args, "-p", str(port)], tmp / "nats.log", port)
        self.url = f"nats://127.0.0.1:{port}"


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[_Nats]:
    try:
        server = _Nats(tmp_path)
    except ServerMissing as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {e}")
        pytest.skip(str(e))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_nats_killed_and_restarted_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, nats: _Nats
) -> None:
    js = _Js(nats.url)
    try:
        with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
            c.client.submit(_app(tmp_path, "v1", nats.url))
            _produce_range(js, range(0, N // 2))
            poll_for(lambda: js.count("OUT") > N // 8, 30, what="output")
            nats.stop(signal.SIGKILL)
            poll_for(
                lambda: _waiting(c).get("src", "").endswith("unreachable"),
                30,
                what="status to show the source waiting for nats",
            )
            waiting = _waiting(c)
            nats.start()
            _produce_range(js, range(N // 2, N))
            _wait(c, js, lambda: js.count("OUT") >= N, 90, "every message counted")
            _wait(c, js, lambda: js.ack_pending("js") == 0, 30, "no unacked messages")
            poll_for(
                lambda: all(
                    not i.waiting for p in c.client.status("js").apps[0].pes for i in p.instances
                ),
                30,
                what="no PE waiting",
            )
            rows = js.output()
    finally:
        js.close()
    assert "src" in waiting, waiting
    assert waiting["src"] == f"{nats.url} unreachable", waiting
    _check(rows)


def _waiting(c: LocalCluster) -> dict[str, str]:
    """PE -> what its (first) waiting instance waits for, from status."""
    return {
        p.name: i.waiting
        for p in reversed(c.client.status("js").apps[0].pes)
        for i in reversed(p.instances)
        if i.waiting
    }


def _wait(c: LocalCluster, js: _Js, cond: Any, timeout: float, what: str) -> None:
    """poll_for, printing the app's status and the cluster's logs when it times out."""
    try:
        poll_for(cond, timeout, what=what)
    except TimeoutError:
        print(c.streamctl("status", "js").stdout, js.count("OUT"), js.ack_pending("js"))
        print(c.logs()[-8000:])
        raise


def _produce_range(js: _Js, seqs: range) -> None:
    async def batch(start: int, end: int) -> None:
        for s in range(start, end):
            await js.js.publish(f"in.{s % 4}", str(s).encode())

    for start in range(seqs.start, seqs.stop, 100):
        js.loop.run(batch(start, min(seqs.stop, start + 100)), timeout=60)


def _check(rows: list[dict[str, Any]]) -> None:
    seqs = Counter(r["seq"] for r in rows)
    assert set(seqs) == set(range(N)), sorted(set(range(N)) - set(seqs))[:10]
    # Each copy's (seq, key, n): the same n twice is a sink that published again,
    # two counts of one seq a source that emitted it twice.
    twice = sorted((r["seq"], r["key"], r["n"]) for r in rows if seqs[r["seq"]] > 1)
    assert not twice, twice[:20]
    per_key: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        per_key[r["key"]].append(r["n"])
    for key, ns in per_key.items():
        assert sorted(ns) == list(range(1, len(ns) + 1)), key


def test_a_server_that_lost_its_consumer_state_does_not_make_the_source_emit_twice(
    tmp_path: Path, nats: _Nats
) -> None:
    """nats-server writes a consumer's acks to disk a little after it takes them: a
    SIGKILL loses the last ones, and the restarted server delivers those messages
    again. The source acks messages only once a checkpoint covers them, so none of
    them may be emitted a second time."""
    import asyncio
    from types import SimpleNamespace

    from hotwire.connectors.nats_js import JetStreamSource

    js = _Js(nats.url)
    try:
        _produce_range(js, range(0, N // 2))
    finally:
        js.close()
    ctx = SimpleNamespace(app="lost", pe="src", instance=0, parallelism=1, position=0)
    reader = JetStreamSource(url=nats.url, stream="IN", batch=20, ack_wait=1)(ctx)
    emitted: list[int] = []

    async def take(n: int) -> None:
        for _ in range(n):
            emitted.append((await reader.__anext__())["seq"])

    async def run() -> None:
        # Rounds of a read and a complete checkpoint, faster than the server's writes.
        while len(emitted) < N // 4:
            await take(20)
            reader.checkpoint_complete(len(emitted))
        await take(1)  # the acks go out on this step
        nats.stop(signal.SIGKILL)
        nats.start()
        # The rest, through the outage and whatever the server delivers again.
        while len(emitted) < N // 2:
            await asyncio.wait_for(take(1), 60)
            reader.checkpoint_complete(len(emitted))
        await reader.aclose()

    asyncio.run(run())
    twice = sorted(s for s, k in Counter(emitted).items() if k > 1)
    assert not twice, (len(twice), twice[:20])
    assert sorted(emitted) == list(range(1, N // 2 + 1))
