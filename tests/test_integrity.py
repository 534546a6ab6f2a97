"""Integrity on ordinary paths: unusual data, fan-out, failing user code, handovers.

Each test here reproduces a way records or state were lost or duplicated
silently, on a real two-worker cluster, and counts every record.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

N = 3000


def _seqs(path: Path) -> Counter[int]:
    return Counter(r["seq"] for r in read_jsonl(path))


def test_records_with_integer_map_keys_cross_workers(cluster: LocalCluster, tmp_path: Path) -> None:
    """msgpack refuses non-string map keys unless told: such a frame used to be dropped."""
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology("intkeys")
        src = app.source("src", counter(n={N}, rate=3000))
        m = src.map("m", lambda r: {{**r, "m": {{1: "x", 2: {{3: None}}}}}}, parallelism=2)
        m.map("check", lambda r: {{**r, "ok": r["m"][1] == "x" and r["m"][2] == {{3: None}}}},
              parallelism=2).sink("out", file_sink({str(out)!r}))
        """,
    )
    cluster.client.submit(app)
    st = cluster.client.status("intkeys").apps[0]
    assert {i.worker for p in st.pes for i in p.instances} == {"w1", "w2"}
    poll_for(lambda: count_lines(out) >= N, 30, what="every record at the sink")
    rows = read_jsonl(out)
    seqs = Counter(r["seq"] for r in rows)
    assert set(seqs) == set(range(N)) and max(seqs.values()) == 1
    assert all(r["ok"] for r in rows), "integer keys must arrive as integers"
    drops = cluster.streamctl("workers", "--json")
    assert drops.returncode == 0, drops.stderr


_INT_STATE_PE = """
from hotwire import Topology
from hotwire.sdk import ProcessPE
from hotwire.testing import counter, file_sink


class Count(ProcessPE):
    # Keyed by int; each key's state is itself a dict with int keys.
    def setup(self, ctx):
        self.ctx = ctx
        self.n = {{}}

    def process(self, r):
        k = r["seq"] % 37
        st = self.n.setdefault(k, {{0: 0}})
        st[0] += 1
        yield {{"seq": r["seq"], "k": k, "n": st[0]}}

    def snapshot(self):
        return self.n

    def restore(self, state):
        for k, v in state.items():
            assert isinstance(k, int) and set(v) == {{0}}, (k, v)
            self.n[k] = v


app = Topology("intstate")
src = app.source("src", counter(n={n}, rate=3000))
c = src.key_by(lambda r: r["seq"] % 37).process("count", Count, parallelism={par})
c.sink("out", file_sink({out!r}))
"""


def test_integer_keyed_state_survives_a_rescale_across_workers(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    v1 = write_app(tmp_path, "v1.py", _INT_STATE_PE.format(n=N, par=1, out=str(out)))
    v2 = write_app(tmp_path, "v2.py", _INT_STATE_PE.format(n=N, par=3, out=str(out)))
    cluster.client.submit(v1)
    poll_for(lambda: count_lines(out) > N // 4, 20, what="records before the rescale")
    r = cluster.client.upgrade(v2)
    assert r.applied
    assert count_lines(out) < N, "the rescale must happen while records flow"
    poll_for(lambda: count_lines(out) >= N, 30, what="every record at the sink")
    rows = read_jsonl(out)
    seqs = Counter(r["seq"] for r in rows)
    assert set(seqs) == set(range(N)) and max(seqs.values()) == 1
    last: dict[int, int] = defaultdict(int)
    for row in rows:
        assert row["n"] == last[row["k"]] + 1, f"key {row['k']}: count reset or skipped"
        last[row["k"]] = row["n"]


def test_branches_and_broadcast_do_not_share_record_objects(tmp_path: Path) -> None:
    """On one worker every channel is local: a PE that mutates its input must not
    change what a sibling branch or another broadcast receiver sees."""
    outs = {k: tmp_path / f"{k}.jsonl" for k in ("mut", "see", "b")}
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        def mutate(r):
            r["touched"] = True
            r["seq"] = r["seq"]
            return r

        def look(r):
            return {{"seq": r["seq"], "touched": "touched" in r}}

        def bump(r):
            r["n"] = r.get("n", 0) + 1
            return dict(r)

        app = Topology("fanout")
        src = app.source("src", counter(n={N}, rate=5000))
        src.map("mut", mutate).sink("mut_out", file_sink({str(outs["mut"])!r}))
        src.map("see", look).sink("see_out", file_sink({str(outs["see"])!r}))
        b = src.broadcast().map("bump", bump, parallelism=2)
        b.sink("b_out", file_sink({str(outs["b"])!r}))
        """,
    )
    with LocalCluster(workers=1, data_dir=tmp_path / "cluster") as c:
        c.client.submit(app)
        poll_for(lambda: count_lines(outs["see"]) >= N, 30, what="every record on the branch")
        poll_for(lambda: count_lines(outs["b"]) >= 2 * N, 30, what="both broadcast copies")
    see = read_jsonl(outs["see"])
    assert sorted(r["seq"] for r in see) == list(range(N))
    assert not any(r["touched"] for r in see), "a sibling branch's mutation leaked"
    b = read_jsonl(outs["b"])
    assert Counter(r["seq"] for r in b) == Counter({s: 2 for s in range(N)})
    assert {r["n"] for r in b} == {1}, "a broadcast receiver saw another's mutation"
