"""A canary's keys adopted by running instances, on a real two-worker cluster
through streamctl: at an abort the old code's instances keep running and take
the canary's keys back with their state (the PE's generation does not change),
through a master restart; at a promote the new instances run once the old
code's instances handed over and take the canary's keys in while they run. A
class that cannot merge state is replaced (abort) or takes every key before it
runs (promote), as before; a merge that fails fails the switch, and the app
restarts from its checkpoint (every record at least once, with the checkpoint's
state). Otherwise
every record is counted once, in order per key, and no count restarts.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import BASE, check_output, read_exact, render

MERGE = "    def merge(self, state):\n        self.n.update(state)\n\n"


def _apps(
    tmp_path: Path, n: int, rate: float, v1_edit: Any = None, v2_edit: Any = None
) -> tuple[Path, str, str]:
    out = tmp_path / "out.jsonl"
    kw: dict[str, Any] = {"out": str(out), "audit": str(tmp_path / "a.jsonl"), "n": n, "rate": rate}
    v1 = render(BASE, **kw)
    assert MERGE in v1, "the scenarios' counting class merges state"
    if v1_edit is not None:
        v1 = v1_edit(v1)
    v2 = render(replace(BASE, count_code=2), **kw)
    if v2_edit is not None:
        v2 = v2_edit(v2)
    return out, str(write_app(tmp_path, "v1.py", v1)), str(write_app(tmp_path, "v2.py", v2))


def _status(cluster: LocalCluster) -> dict[str, Any]:
    res = cluster.streamctl("status", "upg", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _count_pe(cluster: LocalCluster) -> dict[str, Any]:
    [pe] = [p for p in _status(cluster)["pes"] if p["name"] == "count"]
    return pe


def _master_log(cluster: LocalCluster) -> str:
    return "".join(p.read_text(errors="replace") for p in cluster.dir.glob("master.*.log"))


def _canary_records(out: Path) -> int:
    return sum(1 for r in read_jsonl(out) if r.get("code") == 2)


def test_abort_keeps_the_old_instances_through_a_master_restart_then_promote(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    n, rate = 24000, 1000.0
    out, app1, app2 = _apps(tmp_path, n, rate)
    assert cluster.streamctl("submit", app1).returncode == 0
    poll_for(lambda: count_lines(out) > 1000, 20, what="records flowing before the canary")

    assert cluster.streamctl("upgrade", app2, "--canary", "count=20%").returncode == 0
    during = _count_pe(cluster)
    assert during["parallelism"] == 3 and during["canary_percent"] == 20, during
    seen = _canary_records(out)
    poll_for(lambda: _canary_records(out) > seen + 50, 20, what="the canary's code at work")

    ab = cluster.streamctl("canary", "abort", "upg")
    assert ab.returncode == 0, ab.stderr
    assert "canary of 'count' aborted: app 'upg' runs version 1" in ab.stdout
    after = _count_pe(cluster)
    # the old code's instances were not replaced: same generation, same workers
    assert after["gen"] == during["gen"], (during, after)
    assert after["parallelism"] == 2 and after["canary_percent"] is None, after
    assert [i["worker"] for i in after["instances"]] == [
        i["worker"] for i in during["instances"][:2]
    ]
    assert "its keys moved back to the running instances" in _master_log(cluster)
    assert count_lines(out) < n, "the abort must happen while records flow"

    # the placement the abort committed is the one a restarted master loads
    cluster.kill_master()
    cluster.restart_master()
    poll_for(lambda: cluster.live_workers() == 2, 15, what="workers to re-attach")
    st = _status(cluster)
    assert st["canary"] is None and st["version"] == 1
    assert _count_pe(cluster)["gen"] == during["gen"]
    assert [i["index"] for i in _count_pe(cluster)["instances"]] == [0, 1]

    assert cluster.streamctl("upgrade", app2, "--canary", "count=30%").returncode == 0
    pr = cluster.streamctl("canary", "promote", "upg")
    assert pr.returncode == 0, pr.stderr
    assert _status(cluster)["version"] == 2
    assert "the new instances took the canary's keys in while they ran" in _master_log(cluster)
    assert count_lines(out) < n, "the promote must happen while records flow"
    rows = read_exact(out, n)
    assert {r["code"] for r in rows} == {1, 2}
    hist = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
    assert [c["outcome"] for c in hist["canaries"]] == ["aborted", "promoted"]


def test_a_class_without_merge_is_replaced_at_the_abort(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    n, rate = 8000, 1000.0
    out, app1, app2 = _apps(tmp_path, n, rate, lambda v1: v1.replace(MERGE, ""))
    assert cluster.streamctl("submit", app1).returncode == 0
    poll_for(lambda: count_lines(out) > 1000, 20, what="records flowing before the canary")
    assert cluster.streamctl("upgrade", app2, "--canary", "count=20%").returncode == 0
    during = _count_pe(cluster)
    ab = cluster.streamctl("canary", "abort", "upg")
    assert ab.returncode == 0, ab.stderr
    after = _count_pe(cluster)
    assert after["gen"] > during["gen"] and after["parallelism"] == 2, (during, after)
    log = _master_log(cluster)
    assert "defines no merge(state)" in log and "replacing the PE's instances" in log
    assert _status(cluster)["canary"] is None
    read_exact(out, n)


def test_a_merge_that_fails_restarts_the_app_from_its_checkpoint(tmp_path: Path) -> None:
    # The switch cannot finish (the instance that merges fails): the master restarts
    # the running version, without the canary, from its last checkpoint.
    n, rate = 8000, 1000.0
    boom = "    def merge(self, state):\n        raise RuntimeError('no merge today')\n\n"
    out, app1, app2 = _apps(tmp_path, n, rate, lambda v1: v1.replace(MERGE, boom))
    with LocalCluster(
        workers=2, data_dir=tmp_path / "cluster", heartbeat_timeout=3.0, switch_timeout=3.0
    ) as cluster:
        assert cluster.streamctl("submit", app1).returncode == 0
        poll_for(lambda: count_lines(out) > 1000, 20, what="records flowing before the canary")
        assert cluster.streamctl("upgrade", app2, "--canary", "count=20%").returncode == 0
        ab = cluster.streamctl("canary", "abort", "upg")
        assert ab.returncode == 1
        assert "restarted from its last checkpoint" in ab.stderr, ab.stderr
        assert len(ab.stderr.strip().splitlines()) == 1, ab.stderr
        st = _status(cluster)
        assert st["canary"] is None and st["version"] == 1 and st["recoveries"] >= 1, st
        assert _count_pe(cluster)["parallelism"] == 2
        # At least once from the checkpoint (the file sink is not transactional):
        # nothing lost, every copy of a record saw the same state, counts run 1, 2, 3…
        poll_for(
            lambda: {r["seq"] for r in read_jsonl(out)} >= set(range(n)),
            60,
            what="every record after the restart",
        )
        rows = read_jsonl(out)
        assert check_output(rows, n).lost == 0
        n_of: dict[int, set[int]] = defaultdict(set)
        key_of: dict[int, str] = {}
        for r in rows:
            n_of[r["seq"]].add(r["n"])
            key_of[r["seq"]] = r["key"]
        assert all(len(v) == 1 for v in n_of.values()), "a replayed record saw other state"
        by_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for seq, ns in n_of.items():
            by_key[key_of[seq]].append((seq, next(iter(ns))))
        for key, pairs in by_key.items():
            assert [c for _, c in sorted(pairs)] == list(range(1, len(pairs) + 1)), key
        hist = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
        assert [c["outcome"] for c in hist["canaries"]] == ["aborted"]


def test_a_new_class_without_merge_is_promoted_with_every_key_handed_over_first(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    n, rate = 16000, 1000.0
    out, app1, app2 = _apps(tmp_path, n, rate, v2_edit=lambda v2: v2.replace(MERGE, ""))
    assert cluster.streamctl("submit", app1).returncode == 0
    poll_for(lambda: count_lines(out) > 1000, 20, what="records flowing before the canary")
    assert cluster.streamctl("upgrade", app2, "--canary", "count=20%").returncode == 0
    pr = cluster.streamctl("canary", "promote", "upg")
    assert pr.returncode == 0, pr.stderr
    assert _status(cluster)["version"] == 2 and _status(cluster)["canary"] is None
    log = _master_log(cluster)
    assert "defines no merge(state)" in log and "the promote hands every key over first" in log
    assert "took the canary's keys in" not in log
    assert count_lines(out) < n, "the promote must happen while records flow"
    rows = read_exact(out, n)
    assert {r["code"] for r in rows} == {1, 2}
