"""A real local cluster: submit, exactly-once delivery, key partitioning, CLI errors,
master restarts and garbage on the data port."""

from __future__ import annotations

import json
import socket
import struct
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import pytest

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

N = 20_000


def _pipeline_app(tmp_path: Path, name: str, n: int, out: Path) -> str:
    """source (n records at 2,000/s) -> map x2 -> JSON-lines sink."""
    return write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology({name!r})
        src = app.source("src", counter(n={n}, rate=2000))
        src.map("m", lambda r: r, parallelism=2).sink("out", file_sink({str(out)!r}))
        """,
    )


def test_parallel_app_delivers_every_record_exactly_once(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology("once")
        src = app.source("src", counter(n={N}, keys=50))
        m = src.map("tag", lambda r: {{**r, "tag": 1}}, parallelism=3)
        f = m.filter("all", lambda r: r["tag"] == 1, parallelism=2)
        f.sink("out", file_sink({str(out)!r}), parallelism=1)
    """,
    )
    r = cluster.client.submit(app)
    assert (r.app, r.version) == ("once", 1)
    st = cluster.client.status("once").apps[0]
    workers_used = {i.worker for p in st.pes for i in p.instances}
    assert workers_used == {"w1", "w2"}, "instances should spread over both workers"
    poll_for(lambda: count_lines(out) >= N, 30, what="all records at the sink")
    seqs = Counter(r["seq"] for r in read_jsonl(out))
    assert len(seqs) == N and set(seqs) == set(range(N))
    assert max(seqs.values()) == 1, "a record was delivered twice"


def test_key_partitioning_sends_each_key_to_one_instance(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.sdk import ProcessPE
        from hotwire.testing import counter, file_sink

        class Where(ProcessPE):
            def setup(self, ctx):
                self.ctx = ctx
                self.count = {{}}

            def process(self, r):
                k = r["key"]
                self.count[k] = self.count.get(k, 0) + 1
                yield {{"key": k, "inst": self.ctx.instance, "n": self.count[k], "seq": r["seq"]}}

            def snapshot(self):
                return self.count

            def restore(self, state):
                self.count.update(state)

        app = Topology("keys")
        src = app.source("src", counter(n={N}, keys=97))
        w = src.key_by(lambda r: r["key"]).process("where", Where, parallelism=3)
        w.sink("out", file_sink({str(out)!r}))
    """,
    )
    cluster.client.submit(app)
    poll_for(lambda: count_lines(out) >= N, 30, what="all records at the sink")
    rows = read_jsonl(out)
    owners: dict[str, set[int]] = defaultdict(set)
    last: dict[str, int] = {}
    for row in rows:
        owners[row["key"]].add(row["inst"])
        assert row["n"] == last.get(row["key"], 0) + 1, "per-key count skipped or repeated"
        last[row["key"]] = row["n"]
    assert len(owners) == 97
    assert all(len(v) == 1 for v in owners.values()), "a key reached two instances"
    assert len({i for v in owners.values() for i in v}) == 3, (
        "keys should spread over all instances"
    )
    assert sum(last.values()) == N


BAD_APPS = {
    "duplicate name": (
        """
        app = Topology("bad")
        s = app.source("a", src)
        s.map("a", lambda r: r).sink("out", print)
    """,
        "'a'",
    ),
    "stream to nowhere": (
        """
        app = Topology("bad")
        app.source("src", src).map("dangling", lambda r: r)
    """,
        "'dangling'",
    ),
    "cycle": (
        """
        app = Topology("bad")
        s = app.source("src", src)
        a = s.map("a", lambda r: r)
        b = a.map("b", lambda r: r)
        b.sink("out", print)
        app.connect(b, "a")
    """,
        "cycle",
    ),
    "non-callable": (
        """
        app = Topology("bad")
        app.source("src", src).map("m", 42).sink("out", print)
    """,
        "'m'",
    ),
    "parallelism < 1": (
        """
        app = Topology("bad")
        app.source("src", src).map("m", lambda r: r, parallelism=0).sink("out", print)
    """,
        "'m'",
    ),
    "non-serialisable config": (
        """
        app = Topology("bad")
        app.source("src", src).map("m", lambda r: r, config={"f": object()}).sink("out", print)
    """,
        "'m'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_APPS))
def test_submit_reports_validation_errors(cluster: LocalCluster, tmp_path: Path, case: str) -> None:
    body, needle = BAD_APPS[case]
    app = write_app(
        tmp_path,
        "bad.py",
        "from hotwire import Topology\n"
        "def src(ctx):\n    yield 1\n" + __import__("textwrap").dedent(body),
    )
    res = cluster.streamctl("submit", app)
    assert res.returncode == 1, res
    assert res.stdout == ""
    err = res.stderr.strip()
    assert err.startswith("streamctl: ") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert "Traceback" not in err
    st = json.loads(cluster.streamctl("status", "--json").stdout)
    assert st["apps"] == [], "nothing may be registered"


def test_cli_submit_status_workers_kill(cluster: LocalCluster, tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        "app.py",
        """
        from hotwire import Topology
        from hotwire.testing import counter

        app = Topology("cli")
        app.source("src", counter(rate=500)).map("m", lambda r: r, parallelism=2).sink("out", lambda r: None)
    """,
    )
    res = cluster.streamctl("submit", app, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["app"] == "cli" and json.loads(res.stdout)["version"] == 1
    again = cluster.streamctl("submit", app)
    assert again.returncode == 1 and "already running" in again.stderr
    st = json.loads(cluster.streamctl("status", "cli", "--json").stdout)
    assert st["app"] == "cli" and st["version"] == 1
    assert {p["name"]: p["parallelism"] for p in st["pes"]} == {"src": 1, "m": 2, "out": 1}
    assert all({"index", "worker"} <= set(i) for p in st["pes"] for i in p["instances"])
    ws = json.loads(cluster.streamctl("workers", "--json").stdout)["workers"]
    assert sorted(w["name"] for w in ws) == ["w1", "w2"] and all(w["alive"] for w in ws)
    assert cluster.streamctl("kill", "cli").returncode == 0
    poll_for(
        lambda: all(not w.instances for w in cluster.client.workers().workers),
        10,
        what="instances to stop",
    )
    missing = cluster.streamctl("kill", "nope")
    assert missing.returncode == 1 and "not running" in missing.stderr
    usage = cluster.streamctl("submit")
    assert usage.returncode == 2


def test_master_state_survives_restart_and_data_keeps_flowing(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    app = _pipeline_app(tmp_path, "durable", 6000, out)
    cluster.client.submit(app)
    before = cluster.client.status("durable").apps[0]
    poll_for(lambda: count_lines(out) > 200, 10, what="records flowing")
    cluster.stop_master()
    n_down = count_lines(out)
    poll_for(
        lambda: count_lines(out) > n_down + 500, 10, what="records flowing while the master is down"
    )
    cluster.restart_master()
    after = cluster.client.status("durable").apps[0]
    assert after.version == before.version == 1
    assert [(p.name, p.parallelism, [i.worker for i in p.instances]) for p in after.pes] == [
        (p.name, p.parallelism, [i.worker for i in p.instances]) for p in before.pes
    ]
    poll_for(lambda: cluster.live_workers() == 2, 15, what="workers to re-attach")
    poll_for(lambda: count_lines(out) >= 6000, 20, what="all records")
    seqs = Counter(r["seq"] for r in read_jsonl(out))
    assert set(seqs) == set(range(6000)) and max(seqs.values()) == 1


def test_garbage_on_the_data_port_is_dropped(cluster: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    app = _pipeline_app(tmp_path, "robust", 4000, out)
    cluster.client.submit(app)
    host, port = cluster.workers[0].address.rsplit(":", 1)
    import msgpack

    def frame(obj: object) -> bytes:
        body = msgpack.packb(obj)
        return struct.pack(">I", len(body)) + body

    payloads = [
        b"\x00\x00\x00\x05hello-not-msgpack",  # no HELLO first
        frame([0, "intruder"]) + b"\x00\x00\x00\x03\xc1\xc1\xc1",  # HELLO, then undecodable
        frame([0, "intruder"]) + frame([1, "robust", "no>such", [1, 2]]) + frame([9, 1]),
        frame([0, "intruder"]) + b"\xff\xff\xff\xff" + b"x" * 100,  # absurd length
        frame([0, "intruder"]) + b"\x00\x00\x10\x00abc",  # truncated frame
        bytes(range(256)) * 4,
    ]
    for p in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(p)
    poll_for(lambda: count_lines(out) >= 4000, 20, what="all records despite garbage")
    seqs = Counter(r["seq"] for r in read_jsonl(out))
    assert set(seqs) == set(range(4000)) and max(seqs.values()) == 1
    assert cluster.workers[0].proc.poll() is None, "the worker died"
    log = cluster.workers[0].log_path.read_text()
    assert "dropped" in log


def test_bad_grpc_requests_get_clear_status(cluster: LocalCluster) -> None:
    from hotwire.proto import hotwire_pb2 as pb

    stub = cluster.client.stub
    with pytest.raises(grpc.RpcError) as e:
        stub.Submit(pb.SubmitRequest(model_json="{not json", bundle=b"x", bundle_hash="0"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed logical model" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Status(pb.StatusRequest(app="ghost"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert cluster.client.status().apps == []
