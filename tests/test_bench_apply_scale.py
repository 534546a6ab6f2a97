"""bench/apply_scale.py runs end to end on a small app, alone and paired with a copy of
this checkout's package as the baseline (no timing asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "r.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "apply_scale.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc == json.loads(out.read_text())
    return doc


def test_apply_scale_reports_every_field(tmp_path: Path) -> None:
    doc = run(tmp_path, "--pes", "10,20", "--upgrades", "2")
    assert [s["pes"] for s in doc["sizes"]] == [10, 20]
    for s in doc["sizes"]:
        assert s["upgrades"] == 2
        assert 0 < s["apply_ms"]["min"] <= s["apply_ms"]["median"] <= s["apply_ms"]["max"]
        assert {"planned_ms", "prepare_ms", "switch_ms", "commit_ms"} <= s[
            "master_phases_ms"
        ].keys()
        assert {"worker_prepared_ms", "worker_switched_ms"} <= s["worker_batches_ms"].keys()
        assert {"master", "worker0", "worker1"} == s["cpu_ms_per_upgrade"].keys()
        # version 1 is stored whole, the one-PE changes after it as deltas
        stored = s["stored_model_bytes"]
        assert stored["later_versions"]["max"] < stored["first_version"]
    assert all(len(r["apply_ms"]) == 2 for r in doc["runs"])


def test_apply_scale_pairs_two_packages(tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(ROOT / "hotwire", base / "hotwire", ignore=shutil.ignore_patterns("*.pyc"))
    doc = run(tmp_path, "--baseline", str(base), "--pairs", "1", "--pes", "10", "--upgrades", "1")
    (s,) = doc["summary"]
    assert s["pes"] == 10 and len(s["ratio_current_to_baseline"]["per_pair"]) == 1
    runs = doc["runs"]
    assert [r["machine"]["hotwire_package"] for r in runs["baseline"]] == [str(base / "hotwire")]
    assert [r["machine"]["hotwire_package"] for r in runs["current"]] == [str(ROOT / "hotwire")]
