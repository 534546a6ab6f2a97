"""bench/connectors.py runs end to end on a tiny setup: the JSON has every field and
every run committed each record exactly once (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotwire.testing.servers import ServerMissing, find_binary

ROOT = Path(__file__).resolve().parent.parent


def _need(name: str) -> None:
    try:
        find_binary(name)
    except ServerMissing as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {e}")
        pytest.skip(str(e))


def test_connectors_bench_reports_every_field_and_exact_counts(tmp_path: Path) -> None:
    for name in ("redis-server", "initdb", "postgres"):
        _need(name)
    pytest.importorskip("redis")
    pytest.importorskip("psycopg")
    out = tmp_path / "cx.json"
    n = 3000
    args = {
        "--records": n,
        "--runs": 1,
        "--rate": 1000,
        "--latency-seconds": 1,
        "--checkpoint-interval": 0.3,
        "--out": out,
    }
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "connectors.py")]
        + [str(x) for kv in args.items() for x in kv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc == json.loads(out.read_text())
    variants = ("plain", "two_pc", "plain_insert", "no_rows")
    assert {"machine", "config", "latency", "goals", *variants} <= set(doc)
    assert doc["config"]["checkpoint_interval_s"] == 0.3
    for variant in variants:
        (run,) = doc[variant]["runs"]
        assert run["rps"] > 0
        assert (run["rows"], run["lost"], run["duplicated"]) == (n, 0, 0), (variant, run)
        assert run["out_of_range"] == run["keys_with_wrong_counts"] == 0, (variant, run)
    lat = doc["latency"]
    assert (lat["records"], lat["rows"], lat["lost"], lat["duplicated"]) == (1000, 1000, 0, 0)
    assert lat["keys_with_wrong_counts"] == 0
    assert {"p50", "p99", "max"} == set(lat["latency_ms"])
    assert lat["latency_ms"]["p50"] <= lat["latency_ms"]["p99"] <= lat["latency_ms"]["max"]
    assert doc["exact"] is True
    assert {"ratio_vs_plain", "two_pc_cost", "two_pc_vs_no_rows"} <= set(doc)
    assert set(doc["goals"]) == {"records_per_s_ge_100k", "p99_le_1.5x_checkpoint_interval"}
