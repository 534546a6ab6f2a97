"""Failures of real processes: a worker killed, a worker stopped with SIGTERM, a master
killed in the middle of an upgrade. Every record is counted at the sink."""

from __future__ import annotations

import signal
import sqlite3
import threading
from collections import defaultdict
from pathlib import Path

import grpc

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import SCENARIOS, check_output, render

N = 9000
RATE = 3000.0


def _seqs(path: Path) -> set[int]:
    return {r["seq"] for r in read_jsonl(path)}


def _v1(tmp_path: Path, out: Path) -> str:
    """Version 1 of the counting scenario app, N records at RATE, writing to ``out``."""
    kw = {"out": str(out), "audit": str(tmp_path / "a"), "n": N, "rate": RATE}
    return write_app(tmp_path, "v1.py", render(SCENARIOS["change_code"][0], **kw))


def test_killed_worker_recovers_from_checkpoint_at_least_once(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=2.0) as c:
        app = _v1(tmp_path, out)
        c.client.submit(app)
        poll_for(
            lambda: c.client.status("upg").apps[0].last_checkpoint >= 1, 15, what="a checkpoint"
        )
        st = c.client.status("upg").apps[0]
        src_worker = next(i.worker for p in st.pes if p.name == "src" for i in p.instances)
        victim = "w1" if src_worker != "w1" else "w2"
        before = count_lines(out)
        assert before < N
        c.kill_worker(victim)
        poll_for(lambda: c.client.status("upg").apps[0].recoveries >= 1, 20, what="a recovery")
        st = c.client.status("upg").apps[0]
        assert all(i.worker != victim for p in st.pes for i in p.instances)
        poll_for(lambda: _seqs(out) >= set(range(N)), 40, what="every record after recovery")
        rows = read_jsonl(out)
        # At least once: nothing lost. State came back from the checkpoint: every copy of
        # a record carries the same per-key count, and the counts per key run 1, 2, 3...
        n_of: dict[int, set[int]] = defaultdict(set)
        for r in rows:
            n_of[r["seq"]].add(r["n"])
        assert all(len(v) == 1 for v in n_of.values()), "a replayed record saw other state"
        by_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for seq, ns in n_of.items():
            by_key[f"k{seq % 64}"].append((seq, next(iter(ns))))
        for key, pairs in by_key.items():
            assert [n for _, n in sorted(pairs)] == list(range(1, len(pairs) + 1)), key
        v = check_output(rows, N)
        assert v.lost == 0


def test_sigterm_drains_a_worker_without_loss(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with LocalCluster(workers=3, data_dir=tmp_path / "c", heartbeat_timeout=3.0) as c:
        app = _v1(tmp_path, out)
        c.client.submit(app)
        poll_for(lambda: count_lines(out) > N // 4, 20, what="records flowing")
        st = c.client.status("upg").apps[0]
        victim = next(i.worker for p in st.pes if p.name == "count" for i in p.instances)
        proc = next(w for w in c.workers if w.label == victim)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0
        st = c.client.status("upg").apps[0]
        assert all(i.worker != victim for p in st.pes for i in p.instances)
        assert st.version == 1
        poll_for(lambda: count_lines(out) >= N, 30, what="every record")
        v = check_output(read_jsonl(out), N)
        assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v
        assert "instances moved" in proc.log_path.read_text()


def _slow(base: str, where: str) -> str:
    if where == "setup":
        return base.replace(
            "    def setup(self, ctx):\n        self.n = {}",
            "    def setup(self, ctx):\n        import time\n"
            "        time.sleep(4)\n        self.n = {}",
        )
    return base.replace(
        "    def snapshot(self):",
        "    def teardown(self):\n        import time\n        time.sleep(4)\n\n"
        "    def snapshot(self):",
    )


def test_master_killed_in_prepare_undoes_the_upgrade(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=2.0) as c:
        kw = {"out": str(out), "audit": str(tmp_path / "a"), "n": N, "rate": RATE}
        c.client.submit(write_app(tmp_path, "v1.py", render(SCENARIOS["change_code"][0], **kw)))
        poll_for(lambda: count_lines(out) > 500, 20)
        v2 = write_app(tmp_path, "v2.py", _slow(render(SCENARIOS["change_code"][1], **kw), "setup"))
        t = threading.Thread(target=lambda: _quiet(lambda: c.client.upgrade(v2)))
        t.start()
        # "upgrading" shows from when the master takes the app, before it has
        # recorded anything; the kill must come once the prepare is on record.
        poll_for(
            lambda: _inflight_phase(c.dir / "master" / "hotwire.db", "upg") == "prepare",
            5,
            what="the master to record the prepare",
        )
        assert c.master is not None
        c.master.stop(signal.SIGKILL)
        t.join(30)
        c.restart_master()
        poll_for(lambda: c.live_workers() == 2, 15)
        poll_for(lambda: c.client.status("upg").apps[0].state == "running", 20)
        st = c.client.status("upg").apps[0]
        assert st.version == 1
        poll_for(lambda: count_lines(out) >= N, 30)
        v = check_output(read_jsonl(out), N)
        assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v
        assert read_jsonl(out)[-1]["code"] == 1
        v3 = write_app(tmp_path, "v3.py", render(SCENARIOS["rescale_stateless"][1], **kw))
        assert c.client.upgrade(v3).to_version == 2
        # The undo is reported as one, not as an error with a traceback.
        log = c.master.log_path.read_text()
        assert "undid an upgrade interrupted in prepare" in log, log[-3000:]
        assert "could not finish" not in log and "Traceback" not in log, log[-3000:]


def test_master_killed_in_switch_finishes_the_upgrade(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=2.0) as c:
        kw = {"out": str(out), "audit": str(tmp_path / "a"), "n": N, "rate": RATE}
        # The old count's teardown is slow, so the switch phase lasts ~4 s.
        c.client.submit(
            write_app(
                tmp_path, "v1.py", _slow(render(SCENARIOS["change_code"][0], **kw), "teardown")
            )
        )
        poll_for(lambda: count_lines(out) > 500, 20)
        v2 = write_app(tmp_path, "v2.py", render(SCENARIOS["change_code"][1], **kw))
        t = threading.Thread(target=lambda: _quiet(lambda: c.client.upgrade(v2)))
        t.start()
        poll_for(
            lambda: any(r.get("code") == 2 for r in read_jsonl(out)[-50:]),
            10,
            what="the switch to happen",
        )
        assert c.master is not None
        c.master.stop(signal.SIGKILL)
        t.join(30)
        c.restart_master()
        poll_for(
            lambda: c.client.status("upg").apps[0].version == 2,
            30,
            what="the interrupted upgrade to be finished",
        )
        poll_for(lambda: count_lines(out) >= N, 30)
        v = check_output(read_jsonl(out), N)
        assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v


def _inflight_phase(db: Path, app: str) -> str | None:
    """The phase of ``app``'s transition a master's store has on record, if any."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    try:
        row = con.execute("SELECT phase FROM inflight WHERE app = ?", (app,)).fetchone()
    finally:
        con.close()
    return row[0] if row else None


def _quiet(fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except grpc.RpcError:
        pass
