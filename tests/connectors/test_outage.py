"""Connectors survive their server going away: a redis-server killed and restarted
on the same port and data, a PostgreSQL server stopped and started mid-run.

While the server is down the PE waits (status says for which server, and since
when), records wait upstream under backpressure in bounded memory, and once it is
back every record arrives exactly once: no pending Redis entries, no prepared
PostgreSQL transactions left. Each outage is logged once, not once per retry.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from connector_servers import redis_url  # noqa: F401 - a fixture

from hotwire.testing import servers
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.servers import Restartable, ServerMissing, find_binary, free_port
from hotwire.worker.instance import SOURCE_BATCH  # records per source batch
from hotwire.worker.transport import CREDITS  # batches a sender may have unprocessed

redis = pytest.importorskip("redis")
psycopg = pytest.importorskip("psycopg")


def _binary(name: str) -> str:
    try:
        return find_binary(name)
    except ServerMissing as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {e}")
        pytest.skip(str(e))
    raise AssertionError("unreachable")


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[tuple[str, Restartable]]:
    """A redis-server that writes every change to its append-only file before it
    replies, so a SIGKILL loses nothing it acknowledged."""
    _binary("redis-server")
    with servers.durable_redis(tmp_path) as got:
        yield got


@pytest.fixture
def restartable_postgres(tmp_path: Path) -> Iterator[tuple[str, Restartable]]:
    """A PostgreSQL server of this test alone (it is stopped and started again)."""
    _binary("initdb")
    _binary("postgres")
    with servers.restartable_postgres(tmp_path) as got:
        yield got


def _pg_ready(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=1).close()
    except psycopg.OperationalError:
        return False
    return True


def _sql(url: str, q: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(q)
        return cur.fetchall() if cur.description else []


def _instances(c: LocalCluster, app: str) -> dict[tuple[str, int], Any]:
    st = c.client.status(app).apps[0]
    return {(p.name, i.index): i for p in st.pes for i in p.instances}


def _status_json(c: LocalCluster, app: str) -> dict[str, Any]:
    out = c.streamctl("status", app, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _outage_lines(c: LocalCluster, server: str) -> tuple[int, int]:
    """Worker log lines saying ``server`` became unreachable / reachable again."""
    text = "".join(p.read_text(errors="replace") for p in c.dir.glob("w*.log"))
    down = sum(1 for line in text.splitlines() if f"{server} unreachable (" in line)
    up = sum(1 for line in text.splitlines() if f"{server} reachable again" in line)
    return down, up


def _app(tmp_path: Path, name: str, src_url: str, sink: str) -> str:
    return write_app(
        tmp_path,
        f"{name}.py",
        f"""
        from hotwire import Topology
        from hotwire.connectors.postgres import PostgresSink
        from hotwire.connectors.redis_streams import RedisStreamSink, RedisStreamSource

        def count(acc, r):
            return {{"n": (acc or {{}}).get("n", 0) + 1, "seq": r["seq"]}}

        app = Topology({name!r})
        src = app.source("src", RedisStreamSource(url={src_url!r}, stream="in", batch=256))
        recs = src.map("parse", lambda e: {{"seq": int(e["fields"]["seq"])}})
        counts = recs.key_by(lambda r: r["seq"] % 16).reduce("count", count, parallelism=2)
        out = counts.map("fmt", lambda kv: {{"key": kv[0], "n": kv[1]["n"], "seq": kv[1]["seq"]}},
                         parallelism=2)
        {sink}
        """,
    )


def _check_exactly_once(rows: list[tuple[int, int, int]], n: int) -> None:
    """``rows`` of (seq, key, n): every seq once, and each key counted 1, 2, 3, ..."""
    seqs = Counter(seq for seq, _k, _n in rows)
    assert set(seqs) == set(range(n)), sorted(set(range(n)) - set(seqs))[:10]
    assert max(seqs.values()) == 1, [s for s, k in seqs.items() if k > 1][:10]
    per_key: dict[int, list[int]] = defaultdict(list)
    for _seq, key, k in rows:
        per_key[key].append(k)
    for key, ns in per_key.items():
        assert sorted(ns) == list(range(1, len(ns) + 1)), key


def _feed(r: Any, seqs: range) -> None:
    for start in range(seqs.start, seqs.stop, 1000):
        with r.pipeline(transaction=False) as p:
            for s in range(start, min(seqs.stop, start + 1000)):
                p.xadd("in", {"seq": s})
            p.execute()


def test_redis_killed_and_restarted_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, durable_redis: tuple[str, Restartable]
) -> None:
    url, server = durable_redis
    n = 6000
    r = redis.Redis.from_url(url, decode_responses=True)
    # Entries arrive at about 1500/s, so the kill below lands mid-run.
    paused, idle = threading.Event(), threading.Event()
    stop = threading.Event()

    def produce() -> None:
        for start in range(0, n, 100):
            while paused.is_set() and not stop.is_set():
                idle.set()
                time.sleep(0.02)
            if stop.is_set():
                return
            idle.clear()
            _feed(r, range(start, min(n, start + 100)))
            time.sleep(0.05)
        idle.set()

    sink = f'out.sink("out", RedisStreamSink(url={url!r}, stream="out"))'
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(_app(tmp_path, "app", url, sink))
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            poll_for(lambda: r.xlen("out") > 0 and r.xlen("in") > n // 4, 30, what="output")
            paused.set()
            poll_for(idle.is_set, 10, what="the producer to pause")
            server.stop(signal.SIGKILL)
            display = url
            poll_for(
                lambda: "unreachable" in _instances(c, "app")[("src", 0)].waiting,
                20,
                what="status to show the source waiting for redis",
            )
            doc = _status_json(c, "app")
            src = next(p for p in doc["pes"] if p["name"] == "src")["instances"][0]
            assert src["waiting"] == f"{display} unreachable", src
            assert src["waiting_s"] >= 0
            human = c.streamctl("status", "app").stdout
            assert f"waiting: {display} unreachable since" in human, human
            server.start()
            paused.clear()
            producer.join(60)
            assert not producer.is_alive()
            r = redis.Redis.from_url(url, decode_responses=True)
            poll_for(lambda: r.xlen("out") >= n, 60, what="every entry counted")
            group = "hotwire.app.src"
            poll_for(lambda: int(r.xpending("in", group)["pending"]) == 0, 30, what="all acked")
            poll_for(
                lambda: all(not i.waiting for i in _instances(c, "app").values()),
                20,
                what="no instance waiting",
            )
            down, up = _outage_lines(c, display)
        finally:
            stop.set()
            paused.clear()
    rows = [(int(f["seq"]), int(f["key"]), int(f["n"])) for _id, f in r.xrange("out")]
    _check_exactly_once(rows, n)
    assert r.xlen("out") == n
    # One warning per instance that noticed the outage, and one when it ended:
    # never one per retry (a 2 s outage takes about ten retries).
    assert 1 <= down <= 3, down
    assert up == down


def test_postgres_stopped_and_started_mid_run_waits_in_bounded_memory_and_commits_once(
    tmp_path: Path,
    restartable_postgres: tuple[str, Restartable],
    redis_url: str,  # noqa: F811
) -> None:
    pg, server = restartable_postgres
    _sql(pg, "CREATE TABLE counts (seq bigint, key int, n bigint)")
    n = 150000  # far more than the channels between the source and the sink hold
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(n))
    config = {"url": pg, "table": "counts", "columns": ["seq", "key", "n"]}
    sink = f'out.sink("out", PostgresSink, config={config!r})'
    display = f"postgresql://127.0.0.1:{server.port}/postgres"
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(_app(tmp_path, "app", redis_url, sink))
        # An app of its own on the same workers, which must go on while the sink waits.
        other = write_app(
            tmp_path,
            "other.py",
            """
            from hotwire import Topology
            from hotwire.testing import counter

            app = Topology("other")
            src = app.source("src", counter(rate=400), parallelism=2)
            src.sink("out", lambda r: None, parallelism=2)
            """,
        )
        c.client.submit(other)
        pg_sink_worker = _instances(c, "app")[("out", 0)].worker
        assert pg_sink_worker in {
            i.worker for (pe, _), i in _instances(c, "other").items() if pe == "out"
        }
        poll_for(lambda: _sql(pg, "SELECT count(*) FROM counts")[0][0] > 0, 30, what="rows")
        server.stop(signal.SIGINT)  # fast shutdown: sessions end, prepared ones stay
        poll_for(
            lambda: "unreachable" in _instances(c, "app")[("out", 0)].waiting,
            20,
            what="status to show the sink waiting for postgres",
        )
        assert _instances(c, "app")[("out", 0)].waiting == f"{display} unreachable"

        # Backpressure: the source stops reading while the sink waits, with the
        # records in between bounded by the channels' credits.
        seen: list[int] = []

        def stalled() -> bool:
            seen.append(_instances(c, "app")[("src", 0)].records_out)
            return len(seen) >= 4 and len(set(seen[-4:])) == 1

        poll_for(stalled, 30, what="the source to stop under backpressure")
        inst = _instances(c, "app")
        assert inst[("src", 0)].records_out < n, "the source read everything: no backpressure"
        assert inst[("out", 0)].queued <= 2 * CREDITS * SOURCE_BATCH, inst[("out", 0)].queued
        in_flight = sum(i.queued for i in inst.values())
        channels = 2 + 4 + 4 + 2  # src->parse, parse->count, count->fmt, fmt->out
        assert in_flight <= channels * CREDITS * SOURCE_BATCH, in_flight
        # Emitted by the source and not yet taken by the sink: within the credits too.
        between = inst[("src", 0)].records_out - inst[("out", 0)].records_in
        assert between <= channels * CREDITS * SOURCE_BATCH, between
        assert inst[("out", 0)].waiting_s > 0
        # The waiting sink does not stall the worker: the other app's sink there goes on.
        sinks = [
            k
            for k, i in _instances(c, "other").items()
            if k[0] == "out" and i.worker == pg_sink_worker
        ]
        before = _instances(c, "other")[sinks[0]].records_in
        poll_for(
            lambda: _instances(c, "other")[sinks[0]].records_in > before + 400,
            20,
            what="the other app's sink on the same worker to go on",
        )
        assert "unreachable" in _instances(c, "app")[("out", 0)].waiting

        server.start()
        poll_for(lambda: _pg_ready(pg), 20, what="postgres back")
        poll_for(lambda: _sql(pg, "SELECT count(*) FROM counts")[0][0] >= n, 90, what="every row")
        poll_for(lambda: _sql(pg, "SELECT count(*) FROM pg_prepared_xacts") == [(0,)], 30)
        poll_for(lambda: int(r.xpending("in", "hotwire.app.src")["pending"]) == 0, 30)
        poll_for(
            lambda: all(not i.waiting for i in _instances(c, "app").values()),
            20,
            what="no instance waiting",
        )
        down, up = _outage_lines(c, display)
    _check_exactly_once(_sql(pg, "SELECT seq, key, n FROM counts"), n)
    assert _sql(pg, "SELECT count(*) FROM counts") == [(n,)]
    assert _sql(pg, "SELECT count(*) FROM pg_prepared_xacts") == [(0,)]
    assert down == 1, down
    assert up == 1, up


def test_a_jetstream_commit_waits_for_a_restarted_nats_server_and_publishes_once(
    tmp_path: Path,
) -> None:
    import asyncio
    from types import SimpleNamespace

    import nats

    from hotwire.connectors.nats_js import JetStreamSink
    from hotwire.pe.executors import TransactionalSinkExecutor

    port = free_port()
    store = tmp_path / "js"
    store.mkdir()
    args = [_binary("nats-server"), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)]
    server = Restartable(args, tmp_path / "nats.log", port)
    server.start()
    url = f"nats://127.0.0.1:{port}"
    ctx = SimpleNamespace(app="a", pe="out", instance=0, config={}, waiting="", waiting_since=0.0)
    seen: list[str] = []

    async def count() -> int:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("OUT")
            return int(info.state.messages)
        finally:
            await nc.close()

    async def run() -> int:
        nc = await nats.connect(url)
        await nc.jetstream().add_stream(name="OUT", subjects=["out.>"])
        await nc.close()
        ex = TransactionalSinkExecutor(
            JetStreamSink(url=url, subject="out.x"), ctx, lambda r, e: None
        )
        await ex.setup()
        await ex.process([{"i": i} for i in range(100)])
        await ex.apre_commit(1)
        server.stop()
        commit = asyncio.create_task(ex.acheckpoint_complete(1))
        while not ctx.waiting:
            assert not commit.done(), commit
            await asyncio.sleep(0.05)
        seen.append(ctx.waiting)
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(commit, 60)
        seen.append(ctx.waiting)
        await ex.teardown()
        return await count()

    try:
        published = asyncio.run(run())
    finally:
        server.stop()
    assert seen == [f"{url} unreachable", ""]
    assert published == 100
