"""Upgrade safety on a real two-worker cluster, through streamctl: a renamed PE keeps
its keyed state (every record once, no count restarts), removing a stateful PE is
refused unless its state is dropped explicitly, and ``streamctl diff`` compares
stored versions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import BASE, check_output, render

N = 9000
RATE = 3000.0
# records of the rename test: its upgrade comes after a dry run, each a streamctl
# process, and must still find records flowing on a loaded machine
N_FLOW = 24000


def _pes(cluster: LocalCluster, app: str) -> dict[str, int]:
    return {p.name: p.gen for p in cluster.client.status(app).apps[0].pes}


def _checkpointed(cluster: LocalCluster, app: str) -> bool:
    return cluster.client.status(app).apps[0].last_checkpoint > 0


def test_rename_keeps_counts_exactly_once(cluster: LocalCluster, tmp_path: Path) -> None:
    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    v1 = render(BASE, out=str(out), audit=str(audit), n=N_FLOW, rate=RATE)
    counting = '.process("count", Count, '
    assert counting in v1
    v2 = v1.replace(counting, '.process("tally", Count, renamed_from="count", ')
    app1 = write_app(tmp_path, "v1.py", v1)
    app2 = write_app(tmp_path, "v2.py", v2)
    assert cluster.streamctl("submit", app1).returncode == 0
    poll_for(lambda: count_lines(out) > N // 4, 20, what="records flowing before the upgrade")
    poll_for(lambda: _checkpointed(cluster, "upg"), 20, what="a checkpoint of version 1")
    before = _pes(cluster, "upg")

    dry = cluster.streamctl("upgrade", app2, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "> pe 'count' renamed to 'tally'" in dry.stdout
    # the plan says which state goes where, and its size at the last checkpoint
    assert re.search(
        r"state of 'count' \(2 instance\(s\), \d+ bytes at the last checkpoint\) -> 'tally' "
        r"\(2 instance\(s\)\), split by key",
        dry.stdout,
    ), dry.stdout
    assert _pes(cluster, "upg") == before, "a dry run changes nothing"

    res = cluster.streamctl("upgrade", app2, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["applied"] and (doc["from_version"], doc["to_version"]) == (1, 2)
    assert count_lines(out) < N_FLOW, "the upgrade must happen while records flow"
    assert doc["changes"]["pes_renamed"] == [["count", "tally"]]
    assert doc["changes"]["pes_added"] == doc["changes"]["pes_removed"] == []
    [move] = doc["state"]
    assert (move["from"], move["to"], move["split"]) == ("count", "tally", "by key")
    assert move["from_instances"] == move["to_instances"] == 2

    poll_for(lambda: count_lines(out) >= N_FLOW, 30, what="every record at the sink")
    v = check_output(read_jsonl(out), N_FLOW)
    # state_resets: a key whose count started again at 1 (its state was lost)
    assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v
    assert not v.problems, v.problems
    after = _pes(cluster, "upg")
    assert "count" not in after and after["tally"] == 2
    assert after["src"] == before["src"] == 1, "the source kept running"
    assert after["out"] == before["out"], "the sink kept its instances"

    # history: the plan applied and where the state went
    hist = cluster.streamctl("history", "upg")
    assert hist.returncode == 0, hist.stderr
    assert "> pe 'count' renamed to 'tally'" in hist.stdout
    assert re.search(r"plan: \d+ instructions on \d worker\(s\)", hist.stdout), hist.stdout
    assert "state: 'count' (2 instance(s)" in hist.stdout
    assert "-> 'tally' (2 instance(s)), by key" in hist.stdout

    # diff between the two stored versions, both ways round
    d = cluster.streamctl("diff", "upg", "1", "2")
    assert d.returncode == 0, d.stderr
    assert d.stdout.splitlines() == [
        "app 'upg': version 1 -> 2",
        "  > pe 'count' renamed to 'tally'",
    ]
    # back from 2 to 1 nothing declares the rename: it is inferred (same code and place)
    back = json.loads(cluster.streamctl("diff", "upg", "2", "1", "--json").stdout)
    assert back["changes"]["pes_renamed"] == [["tally", "count"]]
    assert back["changes"]["renames_inferred"] == ["count"]
    assert back["lines"] == [
        "> pe 'tally' renamed to 'count' (inferred: same code, config and place in the graph)"
    ]
    same = cluster.streamctl("diff", "upg", "2", "2")
    assert same.stdout.splitlines() == ["app 'upg': version 2 -> 2", "  no changes"]
    missing = cluster.streamctl("diff", "upg", "1", "7")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "streamctl: app 'upg' has no version 7; 'streamctl history upg' lists them"
    )


SIDE = """
class Side(ProcessPE):
    def setup(self, ctx):
        self.n = {}

    def process(self, r):
        self.n[r["key"]] = self.n.get(r["key"], 0) + 1
        return ()

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n.update(state)


side = src.key_by(lambda r: r["key"]).process("side", Side, parallelism=2)
side.sink("side_out", lambda r: None)
"""


def test_removing_a_stateful_pe_needs_drop_state(cluster: LocalCluster, tmp_path: Path) -> None:
    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    v2 = render(BASE, out=str(out), audit=str(audit), n=N, rate=RATE)
    v1 = v2 + SIDE  # version 1 has a second keyed class PE, 'side'; version 2 removes it
    app1 = write_app(tmp_path, "v1.py", v1)
    app2 = write_app(tmp_path, "v2.py", v2)
    cluster.client.submit(app1)
    poll_for(lambda: count_lines(out) > N // 5, 20, what="records flowing before the upgrade")
    poll_for(lambda: _checkpointed(cluster, "upg"), 20, what="a checkpoint of version 1")
    before = _pes(cluster, "upg")

    for extra in ((), ("--dry-run",)):
        res = cluster.streamctl("upgrade", app2, *extra)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert re.fullmatch(
            r"streamctl: app 'upg': the upgrade removes PE 'side' \(process, 2 instance\(s\), "
            r"\d+ bytes of state at the last checkpoint\), and its state would be lost; "
            r"nothing was changed\. If the PE was renamed, declare it with renamed_from=\.\.\.; "
            r"to drop the state, upgrade with --drop-state side",
            lines[0],
        ), lines[0]
    with pytest.raises(grpc.RpcError) as err:
        cluster.client.upgrade(app2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # nothing changed: same version, same instances, records still flowing into 'side'
    st = cluster.client.status("upg").apps[0]
    assert st.version == 1 and _pes(cluster, "upg") == before
    assert [v.version for v in cluster.client.history("upg").versions] == [1]

    # naming a PE the upgrade does not remove is refused too
    stray = cluster.streamctl("upgrade", app2, "--drop-state", "count")
    assert stray.returncode == 1
    assert "--drop-state 'count': the upgrade does not remove that PE" in stray.stderr

    res = cluster.streamctl("upgrade", app2, "--drop-state", "side", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["applied"] and doc["to_version"] == 2
    assert doc["changes"]["pes_removed"] == ["side", "side_out"]
    dropped = [m for m in doc["state"] if m["from"] == "side"]
    assert len(dropped) == 1 and dropped[0]["to"] is None
    assert isinstance(dropped[0]["bytes"], int) and dropped[0]["bytes"] > 0
    after = _pes(cluster, "upg")
    assert "side" not in after and after["count"] == before["count"]

    poll_for(lambda: count_lines(out) >= N, 30, what="every record at the sink")
    v = check_output(read_jsonl(out), N)
    assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v
    hist = cluster.streamctl("history", "upg").stdout
    assert re.search(r"state: 'side' \(2 instance\(s\), \d+ bytes\) dropped", hist), hist
