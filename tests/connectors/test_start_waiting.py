"""An instance started while its server is down, outside a user's request (the
recovery after a worker loss), waits for the server with backoff instead of
failing its start; a submit whose connector cannot reach its server is still
refused with the server's error, and nothing is deployed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from connector_servers import redis_url  # noqa: F401 - a fixture
from test_outage import (  # noqa: F401 - fixtures
    _app,
    _check_exactly_once,
    _feed,
    _instances,
    durable_redis,
    restartable_postgres,
)

from hotwire.testing.cluster import LocalCluster, poll_for
from hotwire.testing.servers import Restartable, free_port

redis = pytest.importorskip("redis")
psycopg = pytest.importorskip("psycopg")

N = 3000


def test_a_source_restarted_by_a_recovery_while_redis_is_down_waits_for_it(
    tmp_path: Path,
    durable_redis: tuple[str, Restartable],  # noqa: F811
) -> None:
    url, server = durable_redis
    r = redis.Redis.from_url(url, decode_responses=True)
    _feed(r, range(N // 2))
    sink = f'out.sink("out", RedisStreamSink(url={url!r}, stream="out"), parallelism=2)'
    with LocalCluster(
        data_dir=tmp_path / "cluster", heartbeat_timeout=1.0, checkpoint_interval=0.3
    ) as c:
        c.client.submit(_app(tmp_path, "app", url, sink))
        poll_for(lambda: r.xlen("out") >= N // 2, 60, what="the first half counted")
        src_worker = _instances(c, "app")[("src", 0)].worker
        server.stop(signal.SIGKILL)
        c.kill_worker(src_worker)
        # The recovery starts the app on the other worker; its source and sinks wait.
        poll_for(
            lambda: _waiting_src(c) == f"{url} unreachable",
            60,
            what="status to show the restarted source waiting for redis",
        )
        # The sinks' setup waits too (it failed prepare before, and the restart with it).
        poll_for(
            lambda: all(
                i.waiting == f"{url} unreachable"
                for (pe, _), i in _instances(c, "app").items()
                if pe == "out"
            ),
            30,
            what="status to show the restarted sinks waiting for redis",
        )
        inst = _instances(c, "app")
        assert inst[("src", 0)].worker != src_worker
        assert inst[("src", 0)].waiting_s >= 0
        human = c.streamctl("status", "app").stdout
        assert f"waiting: {url} unreachable since" in human, human
        server.start()
        r = redis.Redis.from_url(url, decode_responses=True)
        _feed(r, range(N // 2, N))
        poll_for(lambda: r.xlen("out") >= N, 90, what="every entry counted")
        poll_for(lambda: int(r.xpending("in", "hotwire.app.src")["pending"]) == 0, 30)
        poll_for(
            lambda: all(not i.waiting for i in _instances(c, "app").values()),
            30,
            what="no instance waiting",
        )
    rows = [(int(f["seq"]), int(f["key"]), int(f["n"])) for _id, f in r.xrange("out")]
    _check_exactly_once(rows, N)
    assert r.xlen("out") == N


def _waiting_src(c: LocalCluster) -> str:
    try:
        return str(_instances(c, "app")[("src", 0)].waiting)
    except Exception:  # the app is being restarted: no status of its PEs yet
        return ""


def test_a_submit_or_an_upgrade_whose_sink_cannot_reach_redis_is_refused_and_changes_nothing(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    good = f'out.sink("out", RedisStreamSink(url={redis_url!r}, stream="out"))'
    bad = f'out.sink("out", RedisStreamSink(url={dead!r}, stream="out"))'
    (tmp_path / "bad").mkdir()
    (tmp_path / "v2").mkdir()
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        res = c.streamctl("submit", _app(tmp_path / "bad", "app", redis_url, bad))
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "Connection refused" in lines[0], lines[0]
        assert not [a for a in c.client.status().apps if a.name == "app"]

        c.client.submit(_app(tmp_path, "app", redis_url, good))
        _feed(r, range(N // 2))
        poll_for(lambda: r.xlen("out") >= N // 2, 60, what="the first half counted")
        res = c.streamctl("upgrade", _app(tmp_path / "v2", "app", redis_url, bad))
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "Connection refused" in lines[0], lines[0]
        st = c.client.status("app").apps[0]
        assert st.version == 1
        # The running version goes on, into the sink it had.
        _feed(r, range(N // 2, N))
        poll_for(lambda: r.xlen("out") >= N, 60, what="every entry counted")
        poll_for(lambda: int(r.xpending("in", "hotwire.app.src")["pending"]) == 0, 30)
    rows = [(int(f["seq"]), int(f["key"]), int(f["n"])) for _id, f in r.xrange("out")]
    _check_exactly_once(rows, N)


def test_a_postgres_sink_set_up_for_a_restart_waits_for_its_server_and_a_submit_does_not(
    tmp_path: Path,
    restartable_postgres: tuple[str, Restartable],  # noqa: F811
) -> None:
    import asyncio
    import re
    from types import SimpleNamespace

    from hotwire.connectors.postgres import PostgresSink
    from hotwire.pe.executors import TransactionalSinkExecutor

    pg, server = restartable_postgres
    psycopg.connect(pg, autocommit=True).execute("CREATE TABLE t (k int)").connection.close()
    display = f"postgresql://127.0.0.1:{server.port}/postgres"
    config = {"url": pg, "table": "t", "columns": ["k"]}

    def ctx() -> SimpleNamespace:
        return SimpleNamespace(
            app="a", pe="out", instance=0, config=config, waiting="", waiting_since=0.0
        )

    server.stop()
    # A submit's setup: refused at once with the server's error.
    with pytest.raises(ValueError, match=re.escape("PostgresSink cannot connect: ")):
        asyncio.run(TransactionalSinkExecutor(PostgresSink, ctx(), lambda r, e: None).setup())
    seen: list[str] = []
    c = ctx()

    async def restart() -> None:
        ex = TransactionalSinkExecutor(PostgresSink, c, lambda r, e: None)
        setup = asyncio.create_task(ex.setup(wait=True))
        while not c.waiting:
            assert not setup.done(), setup
            await asyncio.sleep(0.05)
        seen.append(c.waiting)
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(setup, 60)
        seen.append(c.waiting)
        await ex.process([{"k": 1}])
        await ex.apre_commit(1)
        await ex.acheckpoint_complete(1)
        await ex.teardown()

    asyncio.run(restart())
    assert seen == [f"{display} unreachable", ""]
    with psycopg.connect(pg) as conn:
        assert conn.execute("SELECT k FROM t").fetchall() == [(1,)]


def test_a_sink_moved_by_a_drain_while_redis_is_down_waits_for_it(
    tmp_path: Path,
    durable_redis: tuple[str, Restartable],  # noqa: F811
) -> None:
    url, server = durable_redis
    r = redis.Redis.from_url(url, decode_responses=True)
    _feed(r, range(N // 2))
    sink = f'out.sink("out", RedisStreamSink(url={url!r}, stream="out"), parallelism=2)'
    with LocalCluster(
        workers=3, data_dir=tmp_path / "cluster", heartbeat_timeout=3.0, checkpoint_interval=0.3
    ) as c:
        c.client.submit(_app(tmp_path, "app", url, sink))
        poll_for(lambda: r.xlen("out") >= N // 2, 60, what="the first half counted")
        poll_for(lambda: int(r.xpending("in", "hotwire.app.src")["pending"]) == 0, 30)
        victim = _instances(c, "app")[("out", 0)].worker
        server.stop(signal.SIGKILL)
        # The app is idle: the retiring sink has nothing to pre-commit, and the new
        # one's setup cannot reach redis. The drain moves it all the same: the new
        # sink takes the handover while its setup waits, so the switch completes
        # (before, it waited for the setup, the switch timed out after 30 s, the drain
        # failed and the app restarted from its checkpoint).
        proc = next(w for w in c.workers if w.label == victim)
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
        drained_s = time.monotonic() - t0
        assert "could not drain" not in proc.log_path.read_text(), proc.log_path.read_text()
        inst = _instances(c, "app")
        assert all(i.worker != victim for i in inst.values())
        st = c.client.status("app").apps[0]
        assert (st.version, st.recoveries) == (1, 0), (st.version, st.recoveries, drained_s)
        poll_for(
            lambda: _instances(c, "app")[("out", 0)].waiting == f"{url} unreachable",
            30,
            what="status to show the moved sink waiting for redis",
        )
        server.start()
        r = redis.Redis.from_url(url, decode_responses=True)
        _feed(r, range(N // 2, N))
        poll_for(lambda: r.xlen("out") >= N, 90, what="every entry counted")
        poll_for(lambda: int(r.xpending("in", "hotwire.app.src")["pending"]) == 0, 30)
    rows = [(int(f["seq"]), int(f["key"]), int(f["n"])) for _id, f in r.xrange("out")]
    _check_exactly_once(rows, N)
    assert r.xlen("out") == N


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_a_submit_whose_source_cannot_reach_its_server_is_refused(
    tmp_path: Path,
    redis_url: str,
    kind: str,  # noqa: F811
) -> None:
    """A source's server is probed when a user starts it (submit, upgrade): down, the
    request is refused in one line with the server's error and nothing is deployed;
    an upgrade that would move the source to a dead server leaves version 1 running."""
    port = free_port()
    if kind == "redis":
        source = f'RedisStreamSource(url="redis://127.0.0.1:{port}/0", stream="in")'
    else:
        source = f'JetStreamSource(url="nats://127.0.0.1:{port}", stream="IN")'
    body = f"""
        from hotwire import Topology
        from hotwire.connectors.nats_js import JetStreamSource
        from hotwire.connectors.redis_streams import RedisStreamSource

        app = Topology("probe")
        app.source("src", {{source}}).sink("out", print)
        """
    from hotwire.testing.cluster import write_app

    with LocalCluster(data_dir=tmp_path / "cluster") as c:
        res = c.streamctl("submit", write_app(tmp_path, "bad.py", body.format(source=source)))
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        said = {"redis": "Connection refused", "nats": f"cannot connect to nats://127.0.0.1:{port}"}
        assert said[kind] in lines[0] and "'src'" in lines[0], lines[0]
        assert not [a for a in c.client.status().apps if a.name == "probe"]
        good = f'RedisStreamSource(url={redis_url!r}, stream="in")'
        c.client.submit(write_app(tmp_path, "good.py", body.format(source=good)))
        res = c.streamctl("upgrade", write_app(tmp_path, "v2.py", body.format(source=source)))
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert c.client.status("probe").apps[0].version == 1
