"""Bad input gets a clear error, changes nothing and crashes nothing (DESIGN invariant 5):
malformed app files, malformed requests to the master, misbehaving worker sessions,
clock jumps in heartbeats, and well-formed but lying frames on a worker's data port.

One cluster serves the module: none of these may change it."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc
from hotwire.testing import read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, watched, write_app


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with watched(
        LocalCluster(
            workers=2, data_dir=tmp_path_factory.mktemp("bad-input"), heartbeat_timeout=3.0
        )
    ) as c:
        yield c


def _apps(cluster: LocalCluster) -> list[Any]:
    return list(cluster.client.status().apps)


# ---------------------------------------------------------------------------
# App files
# ---------------------------------------------------------------------------

BAD_FILES = {
    "syntax error": ("from hotwire import Topology\napp = Topology('x'\n", "SyntaxError"),
    "no Topology": ("import os\nx = 1\n", "defines no Topology"),
    "two Topologies": (
        "from hotwire import Topology\na = Topology('a')\nb = Topology('b')\n",
        "defines 2 Topologies (a, b)",
    ),
    "import error": ("import no_such_module_for_hotwire\n", "no_such_module_for_hotwire"),
    "raises at import": ("raise RuntimeError('half-written app')\n", "half-written app"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_app_file_is_refused_in_one_line(
    cluster: LocalCluster, tmp_path: Path, case: str
) -> None:
    body, needle = BAD_FILES[case]
    path = tmp_path / "app.py"
    path.write_text(body)
    res = cluster.streamctl("submit", str(path))
    assert res.returncode == 1, res
    err = res.stderr.strip()
    assert res.stdout == "" and err.startswith("streamctl: ") and len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err, err
    assert _apps(cluster) == [], "nothing may be registered"


# ---------------------------------------------------------------------------
# Requests to the master
# ---------------------------------------------------------------------------


def _model(**pe_changes: Any) -> dict[str, Any]:
    pe = {"callable_name": "f", "config": {}, "fingerprint": "0" * 64, "keyed": False}
    sink = {**pe, "kind": "sink", "name": "o", "parallelism": 1, **pe_changes}
    return {
        "app": "x",
        "pes": [{**pe, "kind": "source", "name": "s", "parallelism": 1}, sink],
        "streams": [{"src": "s", "dst": "o", "partition": "shuffle", "key_fingerprint": ""}],
    }


BUNDLE = b"PK\x05\x06" + b"\x00" * 18  # an empty zip: never loaded, the master refuses first
HASH = hashlib.sha256(BUNDLE).hexdigest()

BAD_REQUESTS: dict[str, tuple[str, bytes, str, grpc.StatusCode, str]] = {
    "not JSON": (
        "{not json",
        BUNDLE,
        HASH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed logical model",
    ),
    "JSON, not a model": (
        '["x"]',
        BUNDLE,
        HASH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed logical model",
    ),
    "unknown PE field": (
        json.dumps(_model(colour="red")),
        BUNDLE,
        HASH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed logical model",
    ),
    "parallelism 0": (
        json.dumps(_model(parallelism=0)),
        BUNDLE,
        HASH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "PE 'o' of app 'x': parallelism must be an integer >= 1, got 0",
    ),
    "unknown kind": (
        json.dumps(_model(kind="teleport")),
        BUNDLE,
        HASH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "PE 'o' of app 'x': unknown kind 'teleport'",
    ),
    "hash mismatch": (
        json.dumps(_model()),
        BUNDLE,
        "0" * 64,
        grpc.StatusCode.INVALID_ARGUMENT,
        "the app bundle does not match its hash; resend it",
    ),
    "empty bundle": (
        json.dumps(_model()),
        b"",
        HASH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request carries no app bundle",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_malformed_submit_and_upgrade_get_a_status(cluster: LocalCluster, case: str) -> None:
    model_json, bundle, h, code, text = BAD_REQUESTS[case]
    stub = cluster.client.stub
    with pytest.raises(grpc.RpcError) as e:
        stub.Submit(
            pb.SubmitRequest(model_json=model_json, bundle=bundle, bundle_hash=h), timeout=10
        )
    assert e.value.code() == code and text in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Upgrade(
            pb.UpgradeRequest(model_json=model_json, bundle=bundle, bundle_hash=h), timeout=10
        )
    assert e.value.code() == code and text in e.value.details(), e.value.details()
    assert _apps(cluster) == []


def test_oversized_request_is_resource_exhausted(cluster: LocalCluster) -> None:
    big = 65 * 1024 * 1024
    channel = grpc.insecure_channel(
        cluster.address, options=[("grpc.max_send_message_length", 2 * big)]
    )
    try:
        stub = pb_grpc.MasterStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Submit(
                pb.SubmitRequest(
                    model_json=json.dumps(_model()), bundle=b"x" * big, bundle_hash="0" * 64
                ),
                timeout=30,
            )
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    finally:
        channel.close()
    assert _apps(cluster) == []
    assert cluster.live_workers() == 2


# ---------------------------------------------------------------------------
# Worker sessions
# ---------------------------------------------------------------------------


def _worker_stub(cluster: LocalCluster) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(cluster.address)
    return channel, pb_grpc.WorkerControlStub(channel)


def _listed(cluster: LocalCluster, name: str) -> list[Any]:
    return [w for w in cluster.client.workers().workers if w.name == name]


def test_a_second_registration_wins_and_the_old_session_is_refused(cluster: LocalCluster) -> None:
    channel, stub = _worker_stub(cluster)
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.Register(pb.RegisterRequest(name="", data_address="127.0.0.1:1"), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        real = _listed(cluster, "w1")[0]
        # Register under a running worker's name: the newer session wins.
        mine = stub.Register(
            pb.RegisterRequest(name="w1", data_address="127.0.0.1:1", slots=0), timeout=5
        ).session
        assert [w.data_address for w in _listed(cluster, "w1")] == ["127.0.0.1:1"]
        # The real w1's old session is refused, so it registers again and wins back.
        poll_for(
            lambda: [w.data_address for w in _listed(cluster, "w1")] == [real.data_address],
            10,
            what="w1 to register again",
        )
        # A replaced session is fenced: refused as such, not as unknown.
        with pytest.raises(grpc.RpcError) as e:
            stub.Heartbeat(pb.HeartbeatRequest(name="w1", session=mine), timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "register again" in e.value.details()
        # Any other session of a known worker is refused as not its current one; a
        # worker the master does not know is not found. Both say: register again.
        for name, session, code in [
            ("w1", "", grpc.StatusCode.FAILED_PRECONDITION),
            ("w1", "stale", grpc.StatusCode.FAILED_PRECONDITION),
            ("nobody", mine, grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                stub.Heartbeat(pb.HeartbeatRequest(name=name, session=session), timeout=5)
            assert e.value.code() == code, (name, session)
            assert "register again" in e.value.details()
        # A control stream opened with a stale session is refused too.
        call = stub.Control(iter([pb.WorkerMessage(hello=pb.Hello(name="w1", session=mine))]))
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        channel.close()
    names = [w.name for w in cluster.client.workers().workers]
    assert sorted(names) == ["w1", "w2"]
    poll_for(lambda: cluster.live_workers() == 2, 10, what="both workers alive")
    assert all(w.proc.poll() is None for w in cluster.workers)


def test_heartbeat_clock_jumps_do_not_change_liveness(cluster: LocalCluster) -> None:
    """The master judges liveness on its own monotonic clock, never on ``sent_unix``."""
    channel, stub = _worker_stub(cluster)
    try:
        session = stub.Register(
            pb.RegisterRequest(name="ghost", data_address="127.0.0.1:1", slots=0), timeout=5
        ).session

        def beat(sent_unix: float) -> None:
            stub.Heartbeat(
                pb.HeartbeatRequest(name="ghost", session=session, sent_unix=sent_unix), timeout=5
            )

        def ghost() -> Any:
            return _listed(cluster, "ghost")[0]

        now = time.time()
        for sent in (
            now - 10 * 365 * 86400,
            0.0,
            -1e18,
            now + 10 * 365 * 86400,
            1e18,
            math.inf,
            -math.inf,
            math.nan,
        ):
            beat(sent)
            g = ghost()
            assert g.alive and 0 <= g.last_heartbeat_age_s < 1.0, (sent, g)
        # The last heartbeat claimed to come from the far future: that must not keep
        # the ghost alive once the master's own clock says it went quiet.
        beat(now + 10 * 365 * 86400)
        t0 = time.monotonic()
        poll_for(lambda: not ghost().alive, 10, what="the ghost to be declared dead")
        assert time.monotonic() - t0 >= 2.5  # heartbeat_timeout is 3 s
        assert 3.0 <= ghost().last_heartbeat_age_s < 6.0
        # Declared dead, its session is fenced (on the master's next recovery tick):
        # a heartbeat under it is refused; it must register again, then a heartbeat
        # with a clock in 1970 keeps it alive.
        poll_for(lambda: "declared dead" in ghost().fenced, 10, what="the ghost to be fenced")
        with pytest.raises(grpc.RpcError) as refused:
            beat(time.time())
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "register again" in (refused.value.details() or "")
        session = stub.Register(
            pb.RegisterRequest(name="ghost", data_address="127.0.0.1:1", slots=0), timeout=5
        ).session
        beat(0.0)
        assert ghost().alive
    finally:
        channel.close()
    assert [w.name for w in cluster.client.workers().workers].count("ghost") == 1
    assert cluster.live_workers() >= 2


# ---------------------------------------------------------------------------
# The data port: well-formed frames that lie
# ---------------------------------------------------------------------------


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


def test_lying_frames_on_a_real_channel_change_nothing(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    n = 4000
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology("lied_to")
        app.source("src", counter(n={n}, rate=2000)).sink("out", file_sink({str(out)!r}))
    """,
    )
    cluster.client.submit(app)
    try:
        poll_for(lambda: len(read_jsonl(out)) > 200, 10, what="records flowing")
        channel = "src@1.0>out@1.0"
        lies = [
            [3, "lied_to", channel, -(10**9)],  # credit that would stall the sender
            [3, "lied_to", channel, "many"],
            [3, "lied_to", channel],  # too short
            [1, "lied_to", channel, 5],  # records that are not a list
            [1, ["lied_to"], channel, []],  # unhashable app
            [4, "lied_to", "nobody", "src@1.0", {"position": 0}],  # state for no instance
            "not even a list",
        ]
        payload = _frame([0, "intruder"]) + b"".join(_frame(x) for x in lies)
        for w in cluster.workers:
            host, port = w.address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(payload + b"\x00\x00\x00\x09abc")  # and a truncated frame
        poll_for(lambda: len(read_jsonl(out)) >= n, 20, what="every record despite the lies")
        seqs = Counter(r["seq"] for r in read_jsonl(out))
        assert set(seqs) == set(range(n)) and max(seqs.values()) == 1
        log = "".join(w.log_path.read_text() for w in cluster.workers)
        assert "dropped a bad frame" in log
        assert all(w.proc.poll() is None for w in cluster.workers)
    finally:
        assert cluster.streamctl("kill", "lied_to").returncode == 0
