"""Online upgrades on a real two-worker cluster, at load, for every kind of change.

Every record's sequence number is counted at the sink: none lost, none
duplicated, per-key order kept, keyed state carried over, the source started
once, and PEs outside the change kept their instances.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import grpc
import pytest

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, upgrade_under_load, write_app
from hotwire.testing.scenarios import SCENARIOS, check_output, read_exact, render

N = 9000
RATE = 3000.0


def _gens(cluster: LocalCluster, app: str) -> dict[str, int]:
    return {p.name: p.gen for p in cluster.client.status(app).apps[0].pes}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_online_upgrade_under_load(cluster: LocalCluster, tmp_path: Path, scenario: str) -> None:
    v1, v2 = SCENARIOS[scenario]
    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    kw = {"out": str(out), "audit": str(audit), "n": N, "rate": RATE}
    app1 = write_app(tmp_path, "v1.py", render(v1, **kw))
    app2 = write_app(tmp_path, "v2.py", render(v2, **kw))
    cluster.client.submit(app1)
    gens_before = _gens(cluster, "upg")
    r = upgrade_under_load(cluster.client, app2, out, N)
    assert (r.from_version, r.to_version) == (1, 2)
    changes = json.loads(r.changes_json)
    rows = read_exact(out, N, 30, context=changes)
    if v2.count_code == 2:
        assert rows[-1]["code"] == 2, "the new code must be live"
    if v2.sink_variant == 2:
        assert rows[-1].get("sink") == 2
    gens_after = _gens(cluster, "upg")
    regenerated = set(changes["regenerated"])
    for pe, gen in gens_after.items():
        if pe in gens_before and pe not in regenerated:
            assert gen == gens_before[pe], f"untouched PE {pe!r} was restarted"
    if v2.src_variant == v1.src_variant:
        assert gens_after["src"] == 1, "the source must keep running"
    if v1.audit_from or v2.audit_from:
        arows = read_jsonl(audit)
        seqs = [a["seq"] for a in arows]
        assert len(seqs) == len(set(seqs)), "audit got a record twice"
        if v1.audit_from and v2.audit_from:  # re-routed: every record exactly once
            poll_for(lambda: count_lines(audit) >= N, 30, what="every record at the audit sink")
            arows = read_jsonl(audit)
            assert sorted(a["seq"] for a in arows) == list(range(N))
        by_key: dict[str, list[int]] = defaultdict(list)
        for a in arows:
            by_key[a["key"]].append(a["seq"])
        assert all(s == sorted(s) for s in by_key.values()), "audit order per key"


def test_failed_setup_leaves_old_version_running(cluster: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    base = render(
        SCENARIOS["change_code"][0], out=str(out), audit=str(tmp_path / "a"), n=N, rate=RATE
    )
    app1 = write_app(tmp_path, "v1.py", base)
    bad = base.replace(
        "    def setup(self, ctx):\n        self.n = {}",
        "    def setup(self, ctx):\n        raise ValueError('model file missing')",
    )
    assert bad != base
    app2 = write_app(tmp_path, "v2.py", bad)
    cluster.client.submit(app1)
    poll_for(lambda: count_lines(out) > N // 4, 20, what="records flowing")
    res = cluster.streamctl("upgrade", app2)
    assert res.returncode == 1
    assert "model file missing" in res.stderr and "'count'" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    st = cluster.client.status("upg").apps[0]
    assert st.version == 1 and {p.name: p.gen for p in st.pes}["count"] == 1
    poll_for(lambda: count_lines(out) >= N, 30, what="every record")
    v = check_output(read_jsonl(out), N)
    assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0)
    # The app upgrades fine afterwards.
    good = write_app(
        tmp_path,
        "v3.py",
        render(
            SCENARIOS["change_code"][1], out=str(out), audit=str(tmp_path / "a"), n=N, rate=RATE
        ),
    )
    assert cluster.client.upgrade(good).to_version == 2


def test_bundle_that_fails_to_import_changes_nothing(cluster: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    base = render(
        SCENARIOS["change_code"][0], out=str(out), audit=str(tmp_path / "a"), n=N, rate=RATE
    )
    cluster.client.submit(write_app(tmp_path, "v1.py", base))
    broken = write_app(tmp_path, "v2.py", base + "\nundefined_name_here\n")
    res = cluster.streamctl("upgrade", broken)
    assert res.returncode == 1 and "undefined_name_here" in res.stderr, res.stderr
    assert cluster.client.status("upg").apps[0].version == 1
    poll_for(lambda: count_lines(out) >= N, 30, what="every record")
    assert check_output(read_jsonl(out), N).ok


def test_worker_killed_during_prepare_aborts(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with LocalCluster(workers=3, data_dir=tmp_path / "c", heartbeat_timeout=2.0) as c:
        base = render(
            SCENARIOS["change_code"][0],
            out=str(out),
            audit=str(tmp_path / "a"),
            n=None,
            rate=1000.0,
        )
        c.client.submit(write_app(tmp_path, "v1.py", base))
        poll_for(lambda: count_lines(out) > 200, 20, what="records flowing")
        slow = base.replace(
            "    def setup(self, ctx):\n        self.n = {}",
            "    def setup(self, ctx):\n        import time\n        time.sleep(3)\n        self.n = {}",
        )
        app2 = write_app(tmp_path, "v2.py", slow)
        import threading

        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["reply"] = c.client.upgrade(app2)
            except grpc.RpcError as e:
                result["error"] = e

        t = threading.Thread(target=run)
        t.start()
        # The new count instances are being set up (3 s); kill a worker hosting one.
        st = c.client.status("upg").apps[0]
        host = next(i.worker for p in st.pes if p.name == "count" for i in p.instances)
        poll_for(lambda: c.client.status("upg").apps[0].state == "upgrading", 5)
        c.kill_worker(host)
        t.join(60)
        err = result.get("error")
        assert isinstance(err, grpc.RpcError), result
        assert "unchanged" in err.details() or "worker" in err.details()
        assert c.client.status("upg").apps[0].version == 1


def test_second_upgrade_in_flight_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    base = render(
        SCENARIOS["change_code"][0], out=str(out), audit=str(tmp_path / "a"), n=None, rate=500.0
    )
    cluster.client.submit(write_app(tmp_path, "v1.py", base))
    slow = base.replace(
        "    def setup(self, ctx):\n        self.n = {}",
        "    def setup(self, ctx):\n        import time\n        time.sleep(2)\n        self.n = {}",
    )
    app2 = write_app(tmp_path, "v2.py", slow)
    app3 = write_app(
        tmp_path,
        "v3.py",
        render(
            SCENARIOS["rescale_stateless"][1],
            out=str(out),
            audit=str(tmp_path / "a"),
            n=None,
            rate=500.0,
        ),
    )
    import threading

    t = threading.Thread(target=lambda: cluster.client.upgrade(app2))
    t.start()
    poll_for(lambda: cluster.client.status("upg").apps[0].state == "upgrading", 5)
    res = cluster.streamctl("upgrade", app3)
    t.join(60)
    assert res.returncode == 1 and "in progress" in res.stderr, res.stderr
    assert cluster.client.status("upg").apps[0].version == 2


def test_dry_run_history_and_rollback(cluster: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    kw = {"out": str(out), "audit": str(tmp_path / "a"), "n": N, "rate": RATE}
    v1, v2 = SCENARIOS["insert_pe"]
    app1 = write_app(tmp_path, "v1.py", render(v1, **kw))
    app2 = write_app(tmp_path, "v2.py", render(v2, **kw))
    cluster.client.submit(app1)
    dry = cluster.streamctl("upgrade", app2, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["applied"] is False and doc["from_version"] == 1 and doc["to_version"] == 2
    assert doc["changes"]["pes_added"] == ["extra"]
    assert doc["changes"]["streams_added"] == ["enrich->extra", "extra->count"]
    assert doc["changes"]["streams_removed"] == ["enrich->count"]
    assert doc["instructions"] > 0
    assert cluster.client.status("upg").apps[0].version == 1
    poll_for(lambda: count_lines(out) > N // 5, 20)
    up = cluster.streamctl("upgrade", app2, "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["applied"] is True
    poll_for(lambda: count_lines(out) > N // 2, 20)
    rb = cluster.streamctl("rollback", "upg", "--json")
    assert rb.returncode == 0, rb.stderr
    rdoc = json.loads(rb.stdout)
    assert rdoc["to_version"] == 3 and rdoc["changes"]["pes_removed"] == ["extra"]
    hist = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
    assert [v["action"] for v in hist["versions"]] == ["submit", "upgrade", "rollback"]
    assert hist["versions"][2]["rolled_back_to"] == 1 and hist["current"] == 3
    human = cluster.streamctl("history", "upg")
    assert "+ pe 'extra'" in human.stdout and "- pe 'extra'" in human.stdout
    poll_for(lambda: count_lines(out) >= N, 30)
    v = check_output(read_jsonl(out), N)
    assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v


_SLOW_IMPORT = """
import time

from hotwire import Topology
from hotwire.testing import counter, file_sink

time.sleep({sleep})  # a large app.py imports slowly
app = Topology("preload")
src = app.source("src", counter(n=100000, rate=500))
src.map("m", lambda r: {{**r, "v": {v}}}, parallelism=2).sink("out", file_sink({out!r}))
"""


def test_workers_import_an_upgrade_while_the_master_plans_it(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """The master sends the new bundle as it starts to plan (LOAD); the prepare that
    follows finds it imported. The upgrade's result does not depend on it."""
    out = tmp_path / "out.jsonl"
    v1 = write_app(tmp_path, "v1.py", _SLOW_IMPORT.format(sleep=0, v=1, out=str(out)))
    v2 = write_app(tmp_path, "v2.py", _SLOW_IMPORT.format(sleep=0.3, v=2, out=str(out)))
    cluster.client.submit(v1)
    poll_for(lambda: count_lines(out) > 10, 20, what="records at the sink")
    assert cluster.client.upgrade(v2).applied
    poll_for(lambda: read_jsonl(out)[-1]["v"] == 2, 10, what="version 2 live")
    logs = "".join(w.log_path.read_text() for w in cluster.workers)
    assert logs.count("loaded ahead of its prepare") == 2, "each worker of the app loads it"
    assert "(preload v0) failed" not in logs, logs[-2000:]
