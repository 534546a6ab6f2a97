"""A worker's exposition: the text it writes (every family, escaping, the kept label
prefixes across scrapes while instances come and go) and its HTTP endpoint on a
real worker (one answer per connection, Server-Timing, HEAD, 404, bad requests)."""

from __future__ import annotations

import random
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from hotwire.metrics import (
    BATCH_BUCKETS,
    E2E_BUCKETS,
    WorkerExposition,
    _LinkStats,
    _WorkerSnapshot,
)
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

SCALARS = (
    "hotwire_records_in_total",
    "hotwire_records_out_total",
    "hotwire_errors_total",
    "hotwire_dead_letters_total",
    "hotwire_instance_failed",
    "hotwire_inbox_records",
    "hotwire_credit_blocked_seconds_total",
    "hotwire_late_dropped_total",
    "hotwire_chained_batches_total",
)


def _snapshot(rng: random.Random, keys: list[tuple[str, str]]) -> _WorkerSnapshot:
    """Random counters for ``keys``: the first instance a source (no batch in), every
    third one a sink with a latency histogram."""
    nb, ne = len(BATCH_BUCKETS) + 1, len(E2E_BUCKETS) + 1
    s = _WorkerSnapshot("w-1", 8, list(keys))
    for n, _ in enumerate(keys):
        s.scalars.append(
            (
                rng.randrange(10**9),
                rng.randrange(10**9),
                rng.randrange(5),
                rng.randrange(5),
                rng.randrange(2),
                rng.randrange(100),
                rng.random() * 3,
                rng.randrange(7),
                rng.randrange(1000),
            )
        )
        s.batches.append([0] * nb if n == 0 else [rng.randrange(50) for _ in range(nb)])
        s.process_s.append(rng.random() * 10)
        if n % 3 == 2:
            s.e2e.append((n, [rng.randrange(9) for _ in range(ne)], rng.random()))
    s.links = [
        _LinkStats("w2", True, 10, 20, 3, 4, {"bad_frame": 2}),
        _LinkStats("w3", False, 1, 2, 0, 0, {}),
    ]
    s.drops = {"bad_frame": 5, "unknown_app": 1}
    s.stats = {"reconnects": 2}
    s.handovers = {("a", "local"): 3}
    s.handover_bytes = {("a", "remote"): 1234}
    return s


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for fam in text_string_to_metric_families(text)
        for x in fam.samples
    }


def test_every_value_is_in_the_text_with_its_labels_escaped() -> None:
    rng = random.Random(7)
    keys = [("a", "src@1.0"), ('we"ird\\app\nx', "m@1.0"), ("a", "snk@2.1")]
    s = _snapshot(rng, keys)
    text = WorkerExposition().render(s)
    assert text.endswith("\n") and not text.startswith("\n") and "\n\n" not in text
    got = _samples(text)
    for (app, iid), row, counts, psum in zip(keys, s.scalars, s.batches, s.process_s, strict=True):
        lab = {"app": app, "pe": iid.partition("@")[0], "instance": iid, "worker": "w-1"}
        for name, value in zip(SCALARS, row, strict=True):
            assert got[(name, tuple(sorted(lab.items())))] == pytest.approx(value), name
        h = "hotwire_batch_process_seconds"
        if not any(counts):
            assert (h + "_count", tuple(sorted(lab.items()))) not in got
            continue
        for le, cum in zip((*BATCH_BUCKETS, float("inf")), _cum(counts), strict=True):
            key = tuple(sorted({**lab, "le": _le(le)}.items()))
            assert got[(h + "_bucket", key)] == cum
        assert got[(h + "_count", tuple(sorted(lab.items())))] == sum(counts)
        assert got[(h + "_sum", tuple(sorted(lab.items())))] == pytest.approx(psum)
    _, counts, total = s.e2e[0]
    lab = {"app": "a", "pe": "snk", "instance": "snk@2.1", "worker": "w-1"}
    assert got[("hotwire_e2e_latency_seconds_count", tuple(sorted(lab.items())))] == sum(counts)
    assert got[("hotwire_e2e_latency_seconds_sum", tuple(sorted(lab.items())))] == total
    drops = {k[1]: v for k, v in got.items() if k[0] == "hotwire_dataplane_drops_total"}
    # w2's two frames are its own; the other three bad frames came from no known peer
    assert drops[(("peer", "w2"), ("reason", "bad_frame"), ("worker", "w-1"))] == 2
    assert drops[(("peer", ""), ("reason", "bad_frame"), ("worker", "w-1"))] == 3
    assert got[("hotwire_dataplane_link_up", (("peer", "w3"), ("worker", "w-1")))] == 0
    assert (
        got[
            (
                "hotwire_state_handover_bytes_total",
                (("app", "a"), ("where", "remote"), ("worker", "w-1")),
            )
        ]
        == 1234
    )


def _cum(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total)
    return out


def _le(le: float) -> str:
    return "+Inf" if le == float("inf") else repr(le)


def test_kept_prefixes_give_the_text_a_fresh_writer_gives() -> None:
    """One writer over scrapes whose instances come and go (and a worker renamed)
    writes exactly what a new writer writes for each snapshot."""
    rng = random.Random(11)
    writer = WorkerExposition()
    pool = [("a", f"p{i}@1.{i % 3}") for i in range(40)] + [("b", "q@1.0")]
    for round_ in range(30):
        keys = rng.sample(pool, rng.randrange(0, len(pool)))
        s = _snapshot(rng, keys)
        if round_ % 10 == 9:
            s.worker = f"w-{round_}"
        assert writer.render(s) == WorkerExposition().render(s)


def test_an_empty_worker_writes_every_family_head() -> None:
    text = WorkerExposition().render(_WorkerSnapshot("w1", 2))
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "hotwire_records_in",
        "hotwire_batch_process_seconds",
        "hotwire_dataplane_drops",
    } <= names


APP = """
from hotwire import Topology
from hotwire.testing.sources import counter

app = Topology("small")
app.source("src", counter(rate=200)).map("m", lambda r: r).sink("out", lambda r: None)
"""


def _raw(addr: str, request: bytes) -> bytes:
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_worker_answers_each_scrape_in_one_response_and_refuses_bad_requests(
    tmp_path: Path,
) -> None:
    app = write_app(tmp_path, "small.py", APP)
    with LocalCluster(workers=1, data_dir=tmp_path / "c", metrics=True) as c:
        c.client.submit(app)
        addr = c.metrics_addresses["w1"]

        def counted() -> str | None:
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
                text = r.read().decode()
            ok = any(
                s.name == "hotwire_records_in_total" and s.labels["pe"] == "out" and s.value > 0
                for f in text_string_to_metric_families(text)
                for s in f.samples
            )
            return text if ok else None

        poll_for(counted, 60, 0.2, what="the sink's records in the exposition")
        answer = _raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK"
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert int(headers["Content-Length"]) == len(body)
        parts = dict(p.split(";dur=") for p in headers["Server-Timing"].split(", "))
        assert {"request", "snapshot", "text"} <= parts.keys()
        assert all(float(v) >= 0 for v in parts.values())
        assert 'pe="out"' in body.decode()

        head_only = _raw(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200 OK") and head_only.endswith(b"\r\n\r\n")

        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{addr}/nope", timeout=10)
        assert e.value.code == 404
        assert e.value.read() == b"not found: the metrics are on /metrics\n"
        # Malformed requests: a 4xx and a line that says what was wrong.
        bad_version = _raw(addr, b"GET /metrics HTTP/x.y\r\n\r\n")
        assert bad_version.startswith(b"HTTP/1.1 400") and b"unsupported protocol" in bad_version
        garbage = _raw(addr, b"garbage\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400") and b"malformed request line" in garbage
        post = _raw(addr, b"POST /metrics HTTP/1.0\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD" in post
        big = _raw(addr, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 431")
        _raw(addr, b"")  # a connection closed without a request

        # The worker still runs, and answers.
        assert c.workers[0].proc.poll() is None
        assert counted() is not None
