"""bench/throughput.py runs end to end on a tiny setup and reports, for every figure and
ratio, the runs, the median and the spread, and CPU seconds per million records beside
records/s (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_reports_spread_and_cpu(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "throughput.py"),
            "--records",
            "20000",
            "--runs",
            "2",
            "--no-tls",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc == json.loads(out.read_text())
    assert "no cluster process alive" in doc["config"]["baseline"]
    for name in ("pipeline", "keyed_count"):
        e = doc[name]
        # the fields earlier readers of the document use
        for k in ("hotwire_rps", "plain_loop_rps", "hotwire_rps_median", "ratio"):
            assert k in e, (name, k)
        assert len(e["hotwire_rps"]) == len(e["plain_loop_rps"]) == 2
        assert len(e["ratio_per_run"]) == 2
        for k in ("hotwire_rps_spread", "plain_loop_rps_spread", "ratio_spread"):
            s = e[k]
            assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"], (name, k, s)
        for k in ("hotwire_cpu_s_per_m", "plain_loop_cpu_s_per_m"):
            cpu = e[k]
            assert len(cpu["runs"]) == 2 and all(c > 0 for c in cpu["runs"]), (name, k, cpu)
        assert e["cpu_ratio"]["of_medians"] > 0
        if "bytewax_rps" in e:
            assert e["bytewax_cpu_s_per_m"]["median"] > 0
            assert len(e["ratio_vs_bytewax_spread"]) == 5
    # The README's table rows come from the document: one per workload, six cells.
    rows = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--table", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    ).stdout.splitlines()
    assert len(rows) == 2 and all(r.startswith("| ") and r.count(" | ") == 5 for r in rows), rows
    assert f"{doc['pipeline']['ratio']:.2f}" in rows[0], rows[0]
