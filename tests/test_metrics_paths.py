"""Metrics that follow records and state on a real cluster (the end-to-end latency
from a source's stamp to a sink, the state bytes handed over on one worker) and the
metrics endpoints of a TLS cluster, scraped over HTTPS by Python and by a real
Prometheus server."""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotwire.security import pki
from hotwire.testing.cluster import LocalCluster, poll_for, scrape_metrics, write_app
from hotwire.testing.servers import (
    ServerMissing,
    find_binary,
    prometheus_server,
    promql,
)

RATE = 400  # records per second from each app's source

E2E_APP = """
import asyncio

from hotwire import Topology
from hotwire.testing.sources import counter

async def slow(r):
    await asyncio.sleep({sleep})  # the sink's own time per record (0: none)

app = Topology("{name}")
app.source("src", counter(rate={rate})).map("m", lambda r: {{**r, "m": 1}}).sink("snk", slow)
"""


def _e2e(c: LocalCluster, app: str) -> tuple[float, float]:
    """(count, sum) of ``app``'s hotwire_e2e_latency_seconds over every worker."""
    count = total = 0.0
    for label, addr in c.metrics_addresses.items():
        if label == "master":
            continue
        fam = scrape_metrics(addr).get("hotwire_e2e_latency_seconds")
        for s in fam.samples if fam else ():
            if s.labels.get("app") != app:
                continue
            assert s.labels["pe"] == "snk", s  # only sinks measure
            if s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_sum"):
                total += s.value
    return count, total


def test_e2e_latency_at_sinks_grows_with_a_slow_sink(tmp_path: Path) -> None:
    """src -> m -> snk placed across two workers (m with src on w1, snk on w2: a local
    channel, then a remote one); two apps at once, one whose sink sleeps 5 ms a record
    (about half the source's rate): its batches wait behind the sink, so its latency
    is many times the other's."""
    with LocalCluster(workers=2, data_dir=tmp_path / "c", metrics=True) as c:
        started = time.monotonic()
        for name, sleep in (("fast", 0), ("slow", 0.005)):
            body = E2E_APP.format(name=name, rate=RATE, sleep=sleep)
            c.streamctl("submit", write_app(tmp_path, f"{name}.py", body)).check_returncode()
            status = json.loads(c.streamctl("status", name, "--json").stdout)
            where = {p["name"]: {i["worker"] for i in p["instances"]} for p in status["pes"]}
            assert where["src"] == where["m"] and where["src"] != where["snk"], where

        # Enough stamped batches at both sinks (the slow one gets its share too).
        poll_for(
            lambda: _e2e(c, "fast")[0] >= 200 and _e2e(c, "slow")[0] >= 10,
            60,
            0.5,
            what="stamped batches counted at both sinks",
        )
        fast_n, fast_sum = _e2e(c, "fast")
        slow_n, slow_sum = _e2e(c, "slow")
        elapsed = time.monotonic() - started
        fast, slow = fast_sum / fast_n, slow_sum / slow_n
        assert 0 < fast < elapsed, (fast, elapsed)
        assert 0 < slow < elapsed, (slow, elapsed)
        assert slow > 5 * fast, (slow, fast)
        # The count keeps growing while records flow.
        poll_for(lambda: _e2e(c, "fast")[0] > fast_n, 20, 0.5, what="the count to grow")
        # The stamp crossed the data plane: w2's sink has only remote input.
        w2 = scrape_metrics(c.metrics_addresses["w2"])
        received = sum(s.value for s in w2["hotwire_dataplane_received_frames"].samples)
        assert received > 0


IDLE_APP = """
import asyncio

from hotwire import Topology

async def idle(ctx):
    while True:  # emits nothing: the forged frames below are the only records
        await asyncio.sleep(3600)
        yield None

app = Topology("forged")
app.source("src", idle).map("m", lambda r: r).sink("snk", lambda r: None)
"""


def test_a_batch_frame_with_a_bad_source_time_is_taken_without_it(tmp_path: Path) -> None:
    """A peer's BATCH frames on the sink's channel whose source time is a string, a
    list, absent, NaN, infinite or a float: every record reaches the sink, only the
    finite float counts in the latency histogram (from 1970: above every bucket),
    nothing is dropped and the worker goes on."""
    with LocalCluster(workers=2, data_dir=tmp_path / "c", metrics=True) as c:
        c.client.submit(write_app(tmp_path, "forged.py", IDLE_APP))
        status = json.loads(c.streamctl("status", "forged", "--json").stdout)
        [snk] = [p for p in status["pes"] if p["name"] == "snk"]
        [m] = [p for p in status["pes"] if p["name"] == "m"]
        worker = snk["instances"][0]["worker"]
        assert m["instances"][0]["worker"] != worker
        [target] = [w for w in c.client.workers().workers if w.name == worker]
        host, _, port = target.data_address.rpartition(":")
        channel = "m@1.0>snk@1.0"
        frames = [
            _frame(0, "w9", "forger"),  # HELLO: a plaintext loopback peer
            _frame(1, "forged", channel, 1, [{"n": 1}], "not a time"),
            _frame(1, "forged", channel, 2, [{"n": 2}], [1, 2]),
            _frame(1, "forged", channel, 3, [{"n": 3}]),
            _frame(1, "forged", channel, 4, [{"n": 4}], float("nan")),
            _frame(1, "forged", channel, 5, [{"n": 5}], float("-inf")),
            _frame(1, "forged", channel, 6, [{"n": 6}], 1.0),
        ]
        addr = c.metrics_addresses[worker]

        def sink_in() -> float:
            fam = scrape_metrics(addr)["hotwire_records_in"]
            return sum(x.value for x in fam.samples if x.labels["pe"] == "snk")

        with socket.create_connection((host, int(port)), timeout=10) as s:
            # Three batches at a time: within the channel's credits (a sender past
            # them has its batches dropped, see test_integrity).
            s.sendall(b"".join(frames[:4]))
            poll_for(lambda: sink_in() == 3, 20, 0.2, what="the first three forged records")
            s.sendall(b"".join(frames[4:]))
            poll_for(lambda: sink_in() == 6, 20, 0.2, what="the six forged records at the sink")
        count, total = _e2e(c, "forged")
        assert count == 1 and total > 1e9, (count, total)
        fam = scrape_metrics(addr)["hotwire_e2e_latency_seconds"]
        buckets = {x.labels["le"]: x.value for x in fam.samples if x.name.endswith("_bucket")}
        assert buckets["60.0"] == 0 and buckets["+Inf"] == 1, buckets
        drops = scrape_metrics(addr).get("hotwire_dataplane_drops")
        assert not drops or all(x.value == 0 for x in drops.samples), drops.samples
        assert all(p.proc.poll() is None for p in [c.master, *c.workers])


def _frame(*items: Any) -> bytes:
    body = msgpack.packb(list(items), use_bin_type=True)
    return struct.pack(">I", len(body)) + body


# -- state bytes handed over on one worker -------------------------------------

KEYS = 100
PAD = 200  # bytes of padding in each key's state

HANDOVER_APP = """
from hotwire import Topology
from hotwire.testing.sources import counter

def add(acc, r):
    return {{"n": (acc or {{"n": 0}})["n"] + 1, "pad": "x" * {pad}}}

app = Topology("handover")
src = app.source("src", counter(rate=400, keys={keys}))
src.key_by(lambda r: r["key"]).reduce("count", add, parallelism={p}).sink("out", lambda r: None)
"""


def _series(addr: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    fam = scrape_metrics(addr).get(family)
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples} if fam else {}


def _handover_bytes(addr: str, where: str) -> float:
    return sum(
        v
        for labels, v in _series(addr, "hotwire_state_handover_bytes").items()
        if dict(labels)["app"] == "handover" and dict(labels)["where"] == where
    )


def test_state_bytes_handed_over_on_one_worker_are_counted(tmp_path: Path) -> None:
    """An online rescale (2 -> 3) of a keyed reduce on one worker: its state moves as
    objects, and hotwire_state_handover_bytes_total{where="local"} grows by the
    state's size as msgpack (KEYS keys of about PAD bytes each), the bytes the
    upgrade's reply reports for the PE; nothing counts as remote."""
    from hotwire.codec import packb

    with LocalCluster(workers=1, data_dir=tmp_path / "c", metrics=True) as c:
        addr = c.metrics_addresses["w1"]
        v1, v2 = (
            write_app(tmp_path, f"h{p}.py", HANDOVER_APP.format(pad=PAD, keys=KEYS, p=p))
            for p in (2, 3)
        )
        c.client.submit(v1)

        def count_in() -> float:
            series = _series(addr, "hotwire_records_in")
            return sum(v for labels, v in series.items() if dict(labels)["pe"] == "count")

        # Every key is in the state: the source cycles through them in order.
        poll_for(lambda: count_in() >= 2 * KEYS, 30, 0.2, what="every key reduced")
        before = _handover_bytes(addr, "local")
        reply = c.client.upgrade(v2)
        after = _handover_bytes(addr, "local")
        grown = after - before
        # Each key's entry is [key, {"n": n, "pad": PAD bytes}]; n takes 1 to 5 bytes.
        lo = sum(len(packb([f"k{i}", {"n": 0, "pad": "x" * PAD}])) for i in range(KEYS))
        hi = sum(len(packb([f"k{i}", {"n": 2**20, "pad": "x" * PAD}])) for i in range(KEYS))
        # Each of the 2 x 3 parts (one per old instance and successor) adds a list
        # header and the state's version around it.
        assert lo <= grown <= hi + 6 * 32, (lo, grown, hi)
        [count] = [h for h in json.loads(reply.handover_json) if h["pe"] == "count"]
        assert count["bytes"] == grown, (count, grown)
        assert count["local"] == count["handovers"] == 6, count
        assert _handover_bytes(addr, "remote") == 0
        handovers = _series(addr, "hotwire_state_handovers")
        local = {dict(labels)["where"]: v for labels, v in handovers.items()}
        assert local.get("remote", 0) == 0 and local["local"] >= 6, local


# -- TLS ---------------------------------------------------------------------


def _https_get(addr: str, ca: Path, server_name: str) -> tuple[int, str]:
    """GET /metrics over TLS, checking the certificate with ``ca`` as ``server_name``."""
    host, _, port = addr.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as s,
    ):
        s.sendall(f"GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def _need(name: str) -> str:
    try:
        return find_binary(name)
    except ServerMissing as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {e}")
        pytest.skip(str(e))


def test_metrics_over_https_on_a_tls_cluster(tmp_path: Path) -> None:
    """A TLS cluster serves /metrics over HTTPS with each node's own certificate: a
    scrape that checks it with the cluster CA works (the master's by its address,
    a worker's by its name), one with another CA fails its handshake, and plain
    HTTP gets a 400 that says to use HTTPS; a real Prometheus configured as the
    README says scrapes all three."""
    _need("prometheus")
    with LocalCluster(workers=2, data_dir=tmp_path / "c", secure=True, metrics=True) as c:
        ca = c.admin.ca
        addrs = c.metrics_addresses
        assert set(addrs) == {"master", "w1", "w2"}, addrs
        c.client.submit(write_app(tmp_path, "tlsobs.py", APP_TLS))
        for label, name in (("master", "127.0.0.1"), ("w1", "w1"), ("w2", "w2")):
            code, text = _https_get(addrs[label], ca, name)
            assert code == 200, (label, text[:200])
            names = {f.name for f in text_string_to_metric_families(text)}
            assert ("hotwire_worker_up" if label == "master" else "hotwire_records_in") in names
        # Another CA's client does not trust the endpoint.
        other = pki.make_ca(tmp_path / "other-ca")
        with pytest.raises(ssl.SSLCertVerificationError):
            _https_get(addrs["w1"], other.cert, "w1")
        # Plain HTTP is refused, in one line that says what to do; the endpoint goes on.
        for label in ("master", "w1"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://{addrs[label]}/metrics", timeout=5)
            assert e.value.code == 400
            assert "serves HTTPS only" in e.value.read().decode()
            again = _https_get(addrs[label], ca, "127.0.0.1" if label == "master" else label)
            assert again[0] == 200

        # Prometheus: scheme https, the CA in tls_config; a worker's certificate names
        # the worker, so its job says server_name (the master's also names 127.0.0.1).
        jobs = ""
        for label, addr in sorted(addrs.items()):
            server_name = f"\n      server_name: {label}" if label != "master" else ""
            jobs += (
                f"  - job_name: hotwire-{label}\n    honor_labels: true\n    scheme: https\n"
                f"    tls_config:\n      ca_file: {ca}{server_name}\n"
                f"    static_configs:\n      - targets: [{json.dumps(addr)}]\n"
            )
        with prometheus_server(tmp_path, jobs) as prom:
            poll_for(
                lambda: len(promql(prom, "up == 1")) == 3,
                30,
                0.2,
                what="prometheus to scrape the master and both workers over HTTPS",
            )
            poll_for(
                lambda: promql(prom, 'hotwire_records_in_total{app="tlsobs",pe="snk"} > 0'),
                30,
                0.5,
                what="the sink's records scraped over HTTPS",
            )


APP_TLS = """
from hotwire import Topology
from hotwire.testing.sources import counter

app = Topology("tlsobs")
app.source("src", counter(rate=200)).map("m", lambda r: r).sink("snk", lambda r: None)
"""
