"""bench/upgrade.py and bench/plot.py run end to end on a tiny setup (no timing asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from workload import chain_lengths, wide_model  # noqa: E402


@pytest.mark.parametrize("pes", [6, 10, 100, 1000, 10000])
def test_wide_topology_has_exactly_that_many_pes(pes: int) -> None:
    assert len(wide_model(pes).graph) == pes
    assert sum(chain_lengths(pes)) + 2 == pes


def test_bench_runs_and_reports_every_field(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "upgrade.py"),
            "--quick",
            "--rate",
            "2000",
            "--keys",
            "500",
            "--runs",
            "1",
            "--restarts",
            "1",
            "--scenarios",
            "change_code",
            "--scaling",
            "10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc == json.loads(out.read_text())
    assert {"machine", "config", "scenarios", "scaling"} <= doc.keys()
    (s,) = doc["scenarios"]
    for k in (
        "name",
        "rate",
        "runs",
        "apply_ms",
        "gap_ms",
        "steady_gap_ms_p99",
        "latency_ms_during",
        "lost",
        "duplicated",
        "state_resets",
        "restart",
        "gap_ratio",
        "peer",
    ):
        assert k in s, k
    assert s["lost"] == s["duplicated"] == s["state_resets"] == 0
    assert s["restart"]["duplicated"] > 0  # the resubmitted source starts again from 0
    assert [x["pes"] for x in doc["scaling"]] == [10, 10000]
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    plot = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plot.py"), str(out), "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_upgrade_safety_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "upgrade.py"),
            "--quick",
            "--rate",
            "2000",
            "--keys",
            "500",
            "--runs",
            "1",
            "--scenarios",
            "migrate_state,canary",
            "--scaling",
            "",
            "--no-peer",
            "--phases",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    migrate, canary = doc["scenarios"]
    assert (migrate["name"], canary["name"]) == ("migrate_state", "canary")
    for s in (migrate, canary):
        assert s["lost"] == s["duplicated"] == s["state_resets"] == 0, s
    # the compatibility check ran on the pre-filled keys (500 keys, two count instances)
    [checked] = migrate["state_check"]
    assert re.fullmatch(r"PE 'count': 500 keys of checkpoint \d+ tried", checked), checked
    runs = {kind: e["runs"] for kind, e in canary["events"].items()}
    assert runs == {"canary_start": 2, "promote": 1, "abort": 1}, runs
    # --phases: the master's debug lines per transition (the submit first, then two
    # canary starts, a promote and an abort, which is planned as well)
    phases = doc["master_phases"]
    assert {k: len(v) for k, v in phases["b_migrate_state"].items()} == {
        "planned_ms": 2,
        "prepare_ms": 2,
        "switch_ms": 2,
        "commit_ms": 2,
    }, phases
    assert {k: len(v) for k, v in phases["b_canary"].items()} == {
        "planned_ms": 5,
        "prepare_ms": 5,
        "switch_ms": 5,
        "commit_ms": 5,
    }, phases
    goals = {g["goal"] for g in doc["goals"]}
    assert "migrate_state: apply_ms p50 <= 50 with the state check on 500 keys" in goals
    assert {
        "canary: gap_ms max <= 10 at the promote",
        "canary: gap_ms max <= 10 at the rollback",
    } <= goals
