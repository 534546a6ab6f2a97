"""Several hosts: the master and each worker in a network namespace of its own.

Every process has its own address on a bridge (``hotwire.testing.netns``); the
test talks to the master from the root namespace, as a client on another host
would. Faults are nftables rules in a host's namespace: random loss of TCP
packets, and partitions from some or all other hosts. Every record is counted
at an exactly-once sink, and a stateful keyed count checks that no state was
counted twice or lost.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hotwire.sinks import read_committed
from hotwire.testing.cluster import poll_for, write_app
from hotwire.testing.netns import NetnsCluster, unavailable

WHY = unavailable()
if WHY is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs network namespaces (run as root): {WHY}")
    pytest.skip(f"network namespaces: {WHY}", allow_module_level=True)

APP = """
from hotwire import Topology
from hotwire.sdk import ProcessPE
from hotwire.sinks import JsonlSink
from hotwire.testing import counter


class Count(ProcessPE):
    def setup(self, ctx):
        self.n = {{}}

    def process(self, r):
        k = r["key"]
        self.n[k] = self.n.get(k, 0) + 1
        yield {{"seq": r["seq"], "key": k, "n": self.n[k], "v": {v}}}

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n.update(state)


app = Topology("hosts")
src = app.source("src", counter(n={n}, rate={rate}, keys=16))
counted = src.key_by(lambda r: r["key"]).process("count", Count, parallelism={par})
{extra}
counted.sink("out", JsonlSink, config={{"dir": {out!r}}})
"""


def _app(
    tmp: Path, name: str, n: int, rate: float, v: int = 1, par: int = 2, extra: str = ""
) -> str:
    body = APP.format(n=n, rate=rate, v=v, par=par, extra=extra, out=str(tmp / "out"))
    return write_app(tmp, f"{name}.py", body)


def _rows(tmp: Path) -> list[dict[str, Any]]:
    out = tmp / "out"
    return read_committed(out) if out.exists() else []


def _check(rows: list[dict[str, Any]], n: int, in_order: bool = True) -> None:
    """Every record once, and each key's count runs 1, 2, ... with no gap or repeat
    (in the order of the records' seqs, unless the source may reorder them:
    ``in_order=False``)."""
    seqs = Counter(r["seq"] for r in rows)
    assert set(seqs) == set(range(n)), f"missing {sorted(set(range(n)) - set(seqs))[:10]}"
    assert max(seqs.values()) == 1, [s for s, k in seqs.items() if k > 1][:10]
    by_key: dict[str, list[int]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["seq"]):
        by_key[r["key"]].append(r["n"])
    for key, counts in by_key.items():
        counts = counts if in_order else sorted(counts)
        assert counts == list(range(1, len(counts) + 1)), (key, counts[:20])


def _status(c: NetnsCluster) -> Any:
    return c.client.status("hosts").apps[0]


def test_hosts_have_their_own_addresses(tmp_path: Path) -> None:
    with NetnsCluster(workers=2, data_dir=tmp_path / "c") as c:
        hosts = c.net.hosts
        assert c.address.startswith(hosts["master"].ip + ":")
        workers = {w.name: w.data_address for w in c.client.workers().workers}
        assert workers == {
            "w1": f"{hosts['w1'].ip}:{workers['w1'].rpartition(':')[2]}",
            "w2": f"{hosts['w2'].ip}:{workers['w2'].rpartition(':')[2]}",
        }
        assert len({h.ip for h in hosts.values()}) == 3


def test_online_upgrades_across_hosts_with_packet_loss_are_exactly_once(tmp_path: Path) -> None:
    n, rate = 12_000, 1500.0
    with NetnsCluster(workers=2, data_dir=tmp_path / "c", checkpoint_interval=0.5) as c:
        for host in c.net.hosts:
            c.net.loss(host, 1)  # 1 % of every host's TCP packets dropped
        c.client.submit(_app(tmp_path, "v1", n, rate))
        poll_for(lambda: len(_rows(tmp_path)) > 1000, 60, what="output")
        steps = [
            _app(tmp_path, "v2", n, rate, v=2),  # change code
            _app(tmp_path, "v3", n, rate, v=2, par=3),  # rescale the keyed count
            _app(tmp_path, "v4", n, rate, v=2, par=3, extra='counted = counted.map("tag", dict)'),
            _app(tmp_path, "v5", n, rate, v=3, par=3),  # remove "tag", change code
        ]
        for app in steps:
            before = len(_rows(tmp_path))
            assert c.client.upgrade(app).applied
            poll_for(lambda b=before: len(_rows(tmp_path)) > b + 300, 60, what="output after")
        poll_for(lambda: len(_rows(tmp_path)) >= n, 120, what="every record")
        assert _status(c).recoveries == 0, "no upgrade needed a restart from a checkpoint"
        dropped = {host: c.net.dropped(host) for host in c.net.hosts}
        assert all(d > 0 for d in dropped.values()), dropped
    rows = _rows(tmp_path)
    _check(rows, n)
    assert {r["v"] for r in rows} == {1, 2, 3}


def _source_worker(c: NetnsCluster) -> str:
    for p in _status(c).pes:
        if p.name == "src":
            return str(p.instances[0].worker)
    raise AssertionError("no source instance")


def _cut_off_replaced_and_healed(
    c: NetnsCluster, tmp: Path, n: int, everyone: bool, alone_s: float
) -> str:
    """Cut the source's worker off the master (or off every host); once the master
    restarted the app on the other worker, let the victim run on alone for
    ``alone_s``, heal it, wait for it to register again and for every record; the
    cluster's logs."""
    victim = _source_worker(c)
    survivor = "w2" if victim == "w1" else "w1"
    c.partition_worker(victim, ["master", survivor, "client"] if everyone else ["master"])
    poll_for(lambda: _status(c).recoveries >= 1, 30, what="a recovery")
    placed = {i.worker for p in _status(c).pes for i in p.instances}
    assert placed == {survivor}, placed
    time.sleep(alone_s)
    c.heal_worker(victim)
    poll_for(
        lambda: any(w.name == victim and w.alive for w in c.client.workers().workers),
        30,
        what="the healed worker to register again",
    )
    poll_for(lambda: len(_rows(tmp)) >= n, 120, what="every record")
    time.sleep(1.0)  # a fenced worker that went on writing would add rows now
    return c.logs()


@pytest.mark.parametrize("cut_from", ["master", "everyone"])
def test_a_worker_cut_off_is_replaced_and_fenced(tmp_path: Path, cut_from: str) -> None:
    """Cut off the master only (its peers still reach it), or off every host."""
    n, rate = 12_000, 1500.0
    with NetnsCluster(
        workers=2, data_dir=tmp_path / "c", heartbeat_timeout=1.0, checkpoint_interval=0.5
    ) as c:
        c.client.submit(_app(tmp_path, "v1", n, rate))
        poll_for(lambda: _status(c).last_checkpoint >= 1, 30, what="a checkpoint")
        logs = _cut_off_replaced_and_healed(c, tmp_path, n, cut_from == "everyone", 1.0)
    _check(_rows(tmp_path), n)
    assert "fenced" in logs, logs[-3000:]


SERVER_APP = """
from hotwire import Topology
from hotwire.connectors.{module} import {cls}
from hotwire.sinks import JsonlSink

app = Topology("hosts")
src = app.source("src", {cls}(url={url!r}, stream={stream!r}, batch=100{extra}))
seqs = src.map("parse", {parse})
counted = seqs.key_by(lambda r: r["key"]).process("count", Count, parallelism=2)
counted.sink("out", JsonlSink, config={{"dir": {out!r}}})
"""

PARSE = {
    "redis": 'lambda r: {"seq": int(r["fields"]["seq"]), "key": r["fields"]["key"]}',
    "nats": 'lambda r: {"seq": int(r["data"]), "key": "k" + str(int(r["data"]) % 16)}',
}


class _Feed:
    """``n`` records into the server's stream at ``rate`` per second, from a thread."""

    def __init__(self, server: str, url: str, n: int, rate: float):
        self.server, self.url, self.n, self.rate = server, url, n, rate
        self.stop = threading.Event()
        if server == "nats":
            asyncio.run(self._nats(create=True))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.server == "nats":
            asyncio.run(self._nats())
            return
        import redis

        r = redis.Redis.from_url(self.url)
        try:
            for s, wait in self._chunks():
                with r.pipeline(transaction=False) as p:
                    for q in range(s, min(s + 50, self.n)):
                        p.xadd("in", {"seq": q, "key": f"k{q % 16}"})
                    p.execute()
                time.sleep(wait())
        finally:
            r.close()

    async def _nats(self, create: bool = False) -> None:
        import nats

        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            if create:
                await js.add_stream(name="IN", subjects=["in.>"])
                return
            for s, wait in self._chunks():
                for q in range(s, min(s + 50, self.n)):
                    await js.publish("in.x", str(q).encode())
                await asyncio.sleep(wait())
        finally:
            await nc.close()

    def _chunks(self) -> Iterator[tuple[int, Callable[[], float]]]:
        t0 = time.monotonic()
        for s in range(0, self.n, 50):
            if self.stop.is_set():
                return
            yield s, lambda s=s: max(0.0, t0 + (s + 50) / self.rate - time.monotonic())


@pytest.mark.parametrize("server", ["redis", "nats"])
def test_a_source_on_a_worker_cut_off_the_master_takes_nothing_once_replaced(
    tmp_path: Path, server: str
) -> None:
    """The worker running the Redis (or JetStream) source is cut off the master only:
    it still reaches the server and runs on, alone, after the master started the
    source again on the other worker. It is fenced in the server (the replacement
    claimed the delivery log): every entry reaches the sink once. Before, with
    Redis, what it read while cut off went into the log behind the replacement's
    position and was never emitted. (The JetStream source, held back by the credits
    of its stopped downstream, may fetch nothing while cut off; its fence is tested
    on its own in tests/connectors/test_source_fencing.py.)"""
    from hotwire.testing.servers import nats_server, redis_server

    pytest.importorskip(server)
    n, rate = 12_000, 1500.0
    start = redis_server if server == "redis" else nats_server
    with (
        NetnsCluster(
            workers=2, data_dir=tmp_path / "c", heartbeat_timeout=1.0, checkpoint_interval=0.5
        ) as c,
        start(tmp_path, host=c.net.client_ip) as url,
    ):
        feed = _Feed(server, url, n, rate)
        count_pe = APP.format(n=0, rate=1.0, v=1, par=2, extra="", out="")
        body = count_pe.split("app = Topology")[0] + SERVER_APP.format(
            module="redis_streams" if server == "redis" else "nats_js",
            cls="RedisStreamSource" if server == "redis" else "JetStreamSource",
            url=url,
            stream="in" if server == "redis" else "IN",
            extra="" if server == "redis" else ", ack_wait=1",
            parse=PARSE[server],
            out=str(tmp_path / "out"),
        )
        try:
            c.client.submit(write_app(tmp_path, "server_app.py", body))
            feed.thread.start()
            poll_for(lambda: _status(c).last_checkpoint >= 1, 30, what="a checkpoint")
            # the victim runs on alone, cut off the master, reaching the server
            logs = _cut_off_replaced_and_healed(c, tmp_path, n, False, 2.0)
        finally:
            feed.stop.set()
            if feed.thread.is_alive():
                feed.thread.join(10)
    # JetStream delivers again, after ack_wait, what the fenced instance fetched:
    # later than the messages after it, so a key's counts follow delivery, not seq.
    _check(_rows(tmp_path), n, in_order=server == "redis")
    if server == "redis":  # its read-ahead reads on while it is cut off: it is fenced
        assert "was replaced" in logs, logs[-3000:]


def test_a_worker_cut_off_one_peer_stalls_is_detected_and_recovers(tmp_path: Path) -> None:
    n, rate = 12_000, 1500.0
    with NetnsCluster(
        workers=2, data_dir=tmp_path / "c", link_timeout=2.0, checkpoint_interval=0.5
    ) as c:
        c.client.submit(_app(tmp_path, "v1", n, rate))
        poll_for(lambda: _status(c).last_checkpoint >= 1, 30, what="a checkpoint")
        c.partition_worker("w1", ["w2"])  # the master still hears both
        poll_for(lambda: _status(c).recoveries >= 1, 60, what="the stalled link to be reported")
        c.heal_worker("w1")
        poll_for(lambda: len(_rows(tmp_path)) >= n, 120, what="every record")
        assert {w.name for w in c.client.workers().workers if w.alive} == {"w1", "w2"}
    _check(_rows(tmp_path), n)


def test_data_flows_while_the_master_is_cut_off_and_it_catches_up(tmp_path: Path) -> None:
    n, rate = 16_000, 1000.0
    with NetnsCluster(
        workers=2, data_dir=tmp_path / "c", heartbeat_timeout=2.0, checkpoint_interval=0.5
    ) as c:
        raw = tmp_path / "raw.jsonl"
        extra = f'from hotwire.testing import file_sink\nsrc.sink("raw", file_sink({str(raw)!r}))'
        c.client.submit(_app(tmp_path, "v1", n, rate, extra=extra))
        poll_for(lambda: _status(c).last_checkpoint >= 1, 30, what="a checkpoint")
        cp = _status(c).last_checkpoint
        c.net.partition("master")  # from every worker and from the client
        before = _lines(raw)
        time.sleep(3.0)  # past the heartbeat timeout
        during = _lines(raw)
        c.net.heal("master")
        poll_for(lambda: _status(c).last_checkpoint > cp + 1, 30, what="checkpoints again")
        poll_for(lambda: len(_rows(tmp_path)) >= n, 120, what="every record")
        st = _status(c)
        workers = c.client.workers().workers
        logs = c.logs()
    assert during > before + 1000, (before, during)  # records flowed without the master
    assert st.recoveries == 0, "nothing restarted: the master, not the workers, was cut off"
    assert {(w.name, w.alive, w.epoch, w.fenced) for w in workers} == {
        ("w1", True, 1, ""),
        ("w2", True, 1, ""),
    }, "no session was fenced"
    assert "the master hears from no worker" in logs, logs[-3000:]
    _check(_rows(tmp_path), n)


def _lines(p: Path) -> int:
    try:
        with open(p, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def test_a_rolling_restart_of_every_worker_under_load_loses_nothing(tmp_path: Path) -> None:
    n, rate = 14_000, 1500.0
    with NetnsCluster(workers=2, data_dir=tmp_path / "c", checkpoint_interval=0.5) as c:
        c.client.submit(_app(tmp_path, "v1", n, rate))
        poll_for(lambda: len(_rows(tmp_path)) > 1000, 60, what="output")
        for name in ("w1", "w2"):
            before = len(_rows(tmp_path))
            c.worker(name).stop(signal.SIGTERM, timeout=60)  # drains: its instances move
            c.restart_worker(name)
            poll_for(
                lambda: sum(w.alive for w in c.client.workers().workers) == 2,
                30,
                what=f"{name} back",
            )
            poll_for(lambda b=before: len(_rows(tmp_path)) > b + 500, 60, what="output after")
        poll_for(lambda: len(_rows(tmp_path)) >= n, 120, what="every record")
        assert _status(c).recoveries == 0, "the drains moved everything online"
    _check(_rows(tmp_path), n)


def test_mtls_across_hosts_with_certificates_for_their_addresses(tmp_path: Path) -> None:
    n, rate = 6_000, 1500.0
    with NetnsCluster(workers=2, data_dir=tmp_path / "c", secure=True) as c:
        c.client.submit(_app(tmp_path, "v1", n, rate))
        poll_for(lambda: len(_rows(tmp_path)) > 1000, 60, what="output")
        assert c.client.upgrade(_app(tmp_path, "v2", n, rate, v=2, par=3)).applied
        poll_for(lambda: len(_rows(tmp_path)) >= n, 120, what="every record")
        workers = c.client.workers().workers
        logs = c.logs()
    _check(_rows(tmp_path), n)
    assert {w.data_plane.get("tls_refused", 0) for w in workers} == {0}
    assert "INSECURE" not in logs
