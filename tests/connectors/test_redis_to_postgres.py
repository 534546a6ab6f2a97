"""Redis Streams -> keyed count -> PostgreSQL on a real cluster, in large batches: the
source reads 2000 entries at a time with the next read under way while a batch is
emitted, the sink writes rows while the epoch runs. A worker holding a source and a
sink instance is killed mid-run; every entry, whatever its content (unicode, COPY's
special characters, empty fields), ends up in the table once."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import pytest
from connector_servers import redis_url  # noqa: F401 - a fixture

from hotwire.connectors.redis_streams import group_name
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

redis = pytest.importorskip("redis")

N = 40_000
KEYS = 50
TEXTS = ["", "ключ ✓ 键", "tab\there", "new\nline", "back\\slash", "\\N", "quote ' \" ,"]


def _fields(seq: int) -> dict[str, Any]:
    return {"seq": seq, "k": seq % KEYS, "txt": TEXTS[seq % len(TEXTS)] + str(seq), "e": ""}


def _sql(url: str, q: str, args: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(q, args)
        return cur.fetchall() if cur.description else []


def _app(tmp_path: Path, rurl: str, pg: str) -> str:
    return write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.connectors.postgres import PostgresSink
        from hotwire.connectors.redis_streams import RedisStreamSource
        from hotwire.sdk import ProcessPE


        class Count(ProcessPE):
            def setup(self, ctx):
                self.n = {{}}

            def process(self, e):
                f = e["fields"]
                k = int(f["k"])
                n = self.n.get(k, 0) + 1
                self.n[k] = n
                yield {{"seq": int(f["seq"]), "k": k, "n": n, "txt": f["txt"] + f["e"]}}

            def snapshot(self):
                return self.n

            def restore(self, state):
                self.n.update(state)


        app = Topology("rp")
        src = app.source("src", RedisStreamSource(url={rurl!r}, stream="in", batch=2000),
                         parallelism=2)
        cnt = src.key_by(lambda e: int(e["fields"]["k"])).process("count", Count, parallelism=2)
        cnt.forward().sink("out", PostgresSink, parallelism=2, config={{
            "url": {pg!r}, "table": "rows", "columns": ["seq", "k", "n", "txt"]}})
        """,
    )


def test_large_batches_with_a_worker_killed_leave_every_entry_in_the_table_once(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    pg_url: str,
) -> None:
    _sql(pg_url, "CREATE TABLE rows (seq bigint, k int, n bigint, txt text)")
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for start in range(0, N, 5000):
        with r.pipeline(transaction=False) as p:
            for s in range(start, start + 5000):
                p.xadd("in", _fields(s))
            p.execute()
    count = lambda: _sql(pg_url, "SELECT count(*) FROM rows")[0][0]  # noqa: E731
    with LocalCluster(
        data_dir=tmp_path / "cluster", heartbeat_timeout=1.0, checkpoint_interval=0.3
    ) as c:
        c.client.submit(_app(tmp_path, redis_url, pg_url))
        st = c.client.status("rp").apps[0]
        on_w2 = {p.name for p in st.pes for i in p.instances if i.worker == "w2"}
        assert {"src", "out"} <= on_w2, "a source and a sink instance run on the killed worker"
        poll_for(lambda: count() > N // 4, 60, what="a quarter of the rows committed")
        c.kill_worker("w2")
        poll_for(lambda: count() >= N, 120, what="every row committed")
        pending = lambda: int(r.xpending("in", group_name("rp", "src"))["pending"])  # noqa: E731
        poll_for(lambda: pending() == 0, 30, what="no pending entries")
        poll_for(lambda: not _sql(pg_url, "SELECT gid FROM pg_prepared_xacts"), 10)
    rows = _sql(pg_url, "SELECT seq, k, n, txt FROM rows")
    assert len(rows) == N, len(rows)
    assert sorted(row[0] for row in rows) == list(range(N)), "every seq once"
    per_key: dict[int, list[int]] = defaultdict(list)
    for seq, k, n, txt in rows:
        f = _fields(seq)
        assert (k, txt) == (f["k"], f["txt"]), seq
        per_key[k].append(n)
    assert sorted(per_key) == list(range(KEYS))
    for k, ns in per_key.items():
        assert sorted(ns) == list(range(1, N // KEYS + 1)), k
