"""NATS JetStream source and sink: exactly once on a real cluster against a real nats-server."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from connector_servers import nats_url  # noqa: F401 - a fixture

from hotwire.connectors.nats_js import JetStreamSink, JetStreamSource, _Loop, consumer_name
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

nats = pytest.importorskip("nats")

N = 4000


class _Js:
    """A synchronous JetStream client for the test's checks, on a loop of its own."""

    def __init__(self, url: str) -> None:
        self.loop = _Loop()
        self.nc = self.loop.run(nats.connect(url))
        self.js = self.nc.jetstream()
        self.loop.run(self.js.add_stream(name="IN", subjects=["in.>"]))
        self.loop.run(self.js.add_stream(name="OUT", subjects=["out.>"]))

    def produce(self, n: int, rate: float, stop: threading.Event) -> threading.Thread:
        async def batch(start: int, end: int) -> None:
            for s in range(start, end):
                await self.js.publish(f"in.{s % 4}", str(s).encode())

        def run() -> None:
            chunk = max(1, int(rate / 20))
            for start in range(0, n, chunk):
                if stop.is_set():
                    return
                self.loop.run(batch(start, min(n, start + chunk)))
                stop.wait(0.05)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def count(self, stream: str) -> int:
        return int(self.loop.run(self.js.stream_info(stream)).state.messages)

    def output(self) -> list[dict[str, Any]]:
        from nats.js import api

        total = self.count("OUT")

        async def read() -> list[dict[str, Any]]:
            cfg = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE)
            sub = await self.js.pull_subscribe("out.>", stream="OUT", config=cfg)
            out: list[dict[str, Any]] = []
            while len(out) < total:
                out += [json.loads(m.data) for m in await sub.fetch(1000, timeout=5)]
            await sub.unsubscribe()
            return out

        return list(self.loop.run(read(), timeout=60))

    def consumers(self, app: str) -> dict[str, Any]:
        """The source PE's durable consumers on stream IN by name."""
        prefix = consumer_name(app, "src")
        infos = self.loop.run(self.js.consumers_info("IN"))
        return {i.name: i for i in infos if i.name.startswith(prefix)}

    def ack_pending(self, app: str) -> int:
        """Messages delivered and not acked, over the source PE's consumers."""
        return sum(int(i.num_ack_pending) for i in self.consumers(app).values())

    def close(self) -> None:
        self.loop.run(self.nc.close())
        self.loop.close()


def _app(
    tmp_path: Path, name: str, url: str, batch: int = 256, tag: int = 1, src_p: int = 1
) -> str:
    return write_app(
        tmp_path,
        f"{name}.py",
        f"""
        from hotwire import Topology
        from hotwire.connectors.nats_js import JetStreamSink, JetStreamSource

        def count(acc, r):
            return {{"n": (acc or {{}}).get("n", 0) + 1, "seq": r["seq"]}}

        app = Topology("js")
        src = app.source("src", JetStreamSource(url={url!r}, stream="IN", batch={batch},
                                                ack_wait=2), parallelism={src_p})
        recs = src.map("parse", lambda m: {{"seq": int(m["data"]), "tag": {tag}}}, parallelism=2)
        counts = recs.key_by(lambda r: r["seq"] % 16).reduce("count", count, parallelism=2)
        out = counts.map("fmt", lambda kv: {{"key": kv[0], "n": kv[1]["n"], "seq": kv[1]["seq"]}})
        out.sink("out", JetStreamSink(url={url!r}, subject="out.counts"), parallelism=2)
        """,
    )


def _check_exactly_once(rows: list[dict[str, Any]]) -> None:
    seqs = Counter(r["seq"] for r in rows)
    assert set(seqs) == set(range(N)), sorted(set(range(N)) - set(seqs))[:10]
    assert max(seqs.values()) == 1, [s for s, k in seqs.items() if k > 1][:10]
    per_key: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        per_key[r["key"]].append(r["n"])
    for key, ns in per_key.items():  # the keyed count saw every message once
        assert sorted(ns) == list(range(1, len(ns) + 1)), key


@pytest.fixture
def js(nats_url: str) -> Any:  # noqa: F811
    client = _Js(nats_url)
    yield client
    client.close()


@pytest.mark.parametrize("src_p", [1, 2])
def test_a_worker_killed_under_load_counts_every_message_once_and_acks_all(
    tmp_path: Path,
    nats_url: str,  # noqa: F811
    js: _Js,
    src_p: int,
) -> None:
    stop = threading.Event()
    with LocalCluster(
        data_dir=tmp_path / "cluster", heartbeat_timeout=1.0, checkpoint_interval=0.3
    ) as c:
        c.client.submit(_app(tmp_path, "app", nats_url, src_p=src_p))
        st = c.client.status("js").apps[0]
        src_workers = [i.worker for p in st.pes if p.name == "src" for i in p.instances]
        if src_p == 2:
            assert set(src_workers) == {"w1", "w2"}, src_workers
        src_worker = src_workers[-1]
        producer = js.produce(N, 1000, stop)
        poll_for(lambda: js.count("OUT") > N // 4, 30, what="output")
        c.kill_worker(src_worker)
        producer.join(30)
        poll_for(lambda: js.count("OUT") >= N, 60, what="every message counted")
        poll_for(lambda: js.ack_pending("js") == 0, 30, what="no unacked messages")
    stop.set()
    _check_exactly_once(js.output())
    assert js.count("OUT") == N
    assert js.ack_pending("js") == 0
    assert sorted(js.consumers("js")) == sorted(
        consumer_name("js", "src", i, src_p) for i in range(src_p)
    )


def test_online_rescales_of_the_source_one_to_two_and_back_keep_every_message_once(
    tmp_path: Path,
    nats_url: str,  # noqa: F811
    js: _Js,
) -> None:
    stop = threading.Event()
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(_app(tmp_path, "p1", nats_url, batch=64, src_p=1))
        producer = js.produce(N, 800, stop)
        try:
            poll_for(lambda: js.count("OUT") > N // 5, 30, what="output at 1")
            assert js.ack_pending("js") > 0  # delivered messages wait for their checkpoint
            assert c.client.upgrade(_app(tmp_path, "p2", nats_url, batch=64, src_p=2)).applied
            src = next(p for p in c.client.status("js").apps[0].pes if p.name == "src")
            assert len(src.instances) == 2
            at_two = js.count("OUT")
            poll_for(lambda: js.count("OUT") > at_two + N // 5, 30, what="output at 2")
            # The rescale's first checkpoint deleted the old consumer.
            poll_for(
                lambda: (
                    sorted(js.consumers("js"))
                    == [consumer_name("js", "src", i, 2) for i in range(2)]
                ),
                30,
                what="only the consumers of 2 instances",
            )
            assert c.client.upgrade(_app(tmp_path, "p3", nats_url, batch=64, src_p=1)).applied
            src = next(p for p in c.client.status("js").apps[0].pes if p.name == "src")
            assert len(src.instances) == 1
        finally:
            producer.join(30)
            stop.set()
        poll_for(lambda: js.count("OUT") >= N, 60, what="every message counted")
        poll_for(lambda: js.ack_pending("js") == 0, 30, what="no unacked messages")
        poll_for(
            lambda: sorted(js.consumers("js")) == [consumer_name("js", "src")],
            30,
            what="only the consumer of 1 instance",
        )
    _check_exactly_once(js.output())
    assert js.count("OUT") == N
    assert js.ack_pending("js") == 0


def test_an_online_upgrade_of_the_source_keeps_its_position(
    tmp_path: Path,
    nats_url: str,  # noqa: F811
    js: _Js,
) -> None:
    stop = threading.Event()
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(_app(tmp_path, "v1", nats_url, batch=256, tag=1))
        producer = js.produce(N, 1000, stop)
        poll_for(lambda: js.count("OUT") > N // 4, 30, what="output")
        assert c.client.upgrade(_app(tmp_path, "v2", nats_url, batch=64, tag=2)).applied
        src = next(p for p in c.client.status("js").apps[0].pes if p.name == "src")
        assert src.gen == 2, "the source PE was replaced, once"
        producer.join(30)
        poll_for(lambda: js.count("OUT") >= N, 60, what="every message counted")
        poll_for(lambda: js.ack_pending("js") == 0, 30, what="no unacked messages")
    stop.set()
    _check_exactly_once(js.output())
    assert js.count("OUT") == N


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "nats://127.0.0.1:1"}, "the stream name is missing; give stream='NAME'"),
        ({"url": "http://h:1", "stream": "IN"}, "url='http://h:1' is not a NATS URL"),
        ({"url": "nats://h:1", "stream": "IN", "durable": "x"}, "unknown option 'durable'"),
    ],
)
def test_bad_source_options_raise_one_clear_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        JetStreamSource(**options)


def test_bad_sink_options_raise_one_clear_error() -> None:
    with pytest.raises(ValueError, match=re.escape("the subject name is missing")):
        JetStreamSink(url="nats://h:1")


def test_bad_config_is_refused_at_submit_and_nothing_is_deployed(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    app = write_app(
        tmp_path,
        "bad.py",
        """
        from hotwire import Topology
        from hotwire.connectors.nats_js import JetStreamSource

        app = Topology("badjs")
        app.source("src", JetStreamSource(url="nats://127.0.0.1:4222")).sink("out", print)
        """,
    )
    res = cluster.streamctl("submit", app)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "JetStreamSource: the stream name is missing" in lines[0]
    assert not [a for a in cluster.client.status().apps if a.name == "badjs"]
