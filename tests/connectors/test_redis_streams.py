"""Redis Streams source and sink: exactly once on a real cluster against a real redis-server."""

from __future__ import annotations

import re
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from connector_servers import redis_url  # noqa: F401 - a fixture

from hotwire.connectors.redis_streams import RedisStreamSink, RedisStreamSource, group_name
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

redis = pytest.importorskip("redis")

N = 6000


def _app(
    tmp_path: Path, name: str, url: str, batch: int = 200, tag: int = 1, src_p: int = 2
) -> str:
    return write_app(
        tmp_path,
        f"{name}.py",
        f"""
        from hotwire import Topology
        from hotwire.connectors.redis_streams import RedisStreamSink, RedisStreamSource

        def count(acc, r):
            return {{"n": (acc or {{}}).get("n", 0) + 1, "seq": r["seq"]}}

        app = Topology("rs")
        src = app.source("src", RedisStreamSource(url={url!r}, stream="in", batch={batch}),
                         parallelism={src_p})
        recs = src.map("parse", lambda e: {{"seq": int(e["fields"]["seq"]), "tag": {tag}}},
                       parallelism=2)
        counts = recs.key_by(lambda r: r["seq"] % 16).reduce("count", count, parallelism=2)
        out = counts.map("fmt", lambda kv: {{"key": kv[0], "n": kv[1]["n"], "seq": kv[1]["seq"]}})
        out.sink("out", RedisStreamSink(url={url!r}, stream="out"), parallelism=2)
        """,
    )


def _produce(r: Any, n: int, rate: float, stop: threading.Event) -> threading.Thread:
    """XADD entries seq=0..n-1 to stream "in" at about ``rate`` per second."""

    def run() -> None:
        chunk = max(1, int(rate / 20))
        for start in range(0, n, chunk):
            if stop.is_set():
                return
            with r.pipeline(transaction=False) as p:
                for s in range(start, min(n, start + chunk)):
                    p.xadd("in", {"seq": s})
                p.execute()
            stop.wait(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _output(r: Any) -> list[dict[str, str]]:
    return [f for _id, f in r.xrange("out")]


def _pending(r: Any, app: str = "rs") -> int:
    return int(r.xpending("in", group_name(app, "src"))["pending"])


def _check_exactly_once(rows: list[dict[str, str]]) -> None:
    seqs = Counter(int(f["seq"]) for f in rows)
    assert set(seqs) == set(range(N)), sorted(set(range(N)) - set(seqs))[:10]
    assert max(seqs.values()) == 1, [s for s, k in seqs.items() if k > 1][:10]
    per_key: dict[int, list[int]] = defaultdict(list)
    for f in rows:
        per_key[int(f["key"])].append(int(f["n"]))
    for key, ns in per_key.items():  # the keyed count saw every entry once
        assert sorted(ns) == list(range(1, len(ns) + 1)), key


def test_a_worker_killed_under_load_counts_every_entry_once_and_acks_all(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stop = threading.Event()
    with LocalCluster(
        data_dir=tmp_path / "cluster", heartbeat_timeout=1.0, checkpoint_interval=0.3
    ) as c:
        c.client.submit(_app(tmp_path, "app", redis_url))
        st = c.client.status("rs").apps[0]
        src_workers = {i.worker for p in st.pes if p.name == "src" for i in p.instances}
        assert src_workers == {"w1", "w2"}, "a source instance must run on the killed worker"
        producer = _produce(r, N, 1500, stop)
        poll_for(lambda: r.xlen("out") > N // 4, 30, what="output")
        assert _pending(r) > 0  # delivered entries wait for their checkpoint
        c.kill_worker("w2")
        producer.join(30)
        poll_for(lambda: r.xlen("out") >= N, 60, what="every entry counted")
        poll_for(lambda: _pending(r) == 0, 30, what="no pending entries")
    stop.set()
    _check_exactly_once(_output(r))
    assert r.xlen("out") == N
    assert _pending(r) == 0


def test_an_online_upgrade_of_the_source_keeps_its_position(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stop = threading.Event()
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(_app(tmp_path, "v1", redis_url, batch=200, tag=1))
        producer = _produce(r, N, 1500, stop)
        poll_for(lambda: r.xlen("out") > N // 4, 30, what="output")
        res = c.client.upgrade(_app(tmp_path, "v2", redis_url, batch=50, tag=2))
        assert res.applied
        src = next(p for p in c.client.status("rs").apps[0].pes if p.name == "src")
        assert src.gen == 2, "the source PE was replaced"
        producer.join(30)
        poll_for(lambda: r.xlen("out") >= N, 60, what="every entry counted")
        poll_for(lambda: _pending(r) == 0, 30, what="no pending entries")
    stop.set()
    rows = _output(r)
    _check_exactly_once(rows)
    assert r.xlen("out") == N


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "redis://127.0.0.1:1/0"}, "the stream name is missing; give stream='NAME'"),
        (
            {"url": "http://127.0.0.1/0", "stream": "in"},
            "url='http://127.0.0.1/0' is not a Redis URL",
        ),
        ({"url": "redis://h/0", "stream": "in", "bacth": 5}, "unknown option 'bacth'"),
        (
            {"url": "redis://h/0", "stream": "in", "batch": "5"},
            "option batch='5' must be of type int",
        ),
    ],
)
def test_bad_options_raise_one_clear_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RedisStreamSource(**options)
    if "batch" not in options and "bacth" not in options:
        with pytest.raises(ValueError, match=re.escape(message)):
            RedisStreamSink(**options)


def test_bad_config_is_refused_at_submit_and_nothing_is_deployed(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    app = write_app(
        tmp_path,
        "bad.py",
        """
        from hotwire import Topology
        from hotwire.connectors.redis_streams import RedisStreamSource

        app = Topology("badrs")
        app.source("src", RedisStreamSource(url="localhost:6379", stream="in")).sink("out", print)
        """,
    )
    res = cluster.streamctl("submit", app)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "RedisStreamSource: url='localhost:6379' is not a Redis URL" in lines[0]
    assert not [a for a in cluster.client.status().apps if a.name == "badrs"]


def test_online_rescales_of_the_source_one_to_two_and_back_keep_every_entry_once(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    stop = threading.Event()
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(_app(tmp_path, "p1", redis_url, batch=100, src_p=1))
        producer = _produce(r, N, 1000, stop)
        try:
            poll_for(lambda: r.xlen("out") > N // 5, 30, what="output at 1")
            assert _pending(r) > 0  # delivered entries wait for their checkpoint
            assert c.client.upgrade(_app(tmp_path, "p2", redis_url, batch=100, src_p=2)).applied
            src = next(p for p in c.client.status("rs").apps[0].pes if p.name == "src")
            assert len(src.instances) == 2
            at_two = r.xlen("out")
            poll_for(lambda: r.xlen("out") > at_two + N // 5, 30, what="output at 2")
            assert c.client.upgrade(_app(tmp_path, "p3", redis_url, batch=100, src_p=1)).applied
            src = next(p for p in c.client.status("rs").apps[0].pes if p.name == "src")
            assert len(src.instances) == 1
        finally:
            producer.join(30)
            stop.set()
        poll_for(lambda: r.xlen("out") >= N, 60, what="every entry counted")
        poll_for(lambda: _pending(r) == 0, 30, what="no pending entries")
    _check_exactly_once(_output(r))
    assert r.xlen("out") == N
    assert _pending(r) == 0
