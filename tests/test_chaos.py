"""The chaos harness, short and seeded: faults of every kind against an exactly-once app.

``bench/chaos.py --faults 5 --seed 1 --windows 100`` kills a worker, kills the master,
cuts the links between workers and freezes a worker past the heartbeat timeout (in a
seeded order), with online upgrades, rescales or rollbacks between them, and checks
every committed record and every committed event-time window. ``--connectors`` runs the
same against a Redis stream source and an exactly-once PostgreSQL sink, killing
redis-server and PostgreSQL as well. See bench/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotwire.testing import servers

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_a_short_seeded_chaos_run_loses_duplicates_and_miscounts_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "chaos.py"),
        "--faults",
        "5",
        "--seed",
        "1",
        "--rate",
        "300",
        "--settle-timeout",
        "20",
        "--data-dir",
        str(tmp_path / "run"),
        "--out",
        str(out),
        "--windows",
        "100",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert res.stdout.strip(), f"no JSON document (exit {res.returncode}):\n{res.stderr[-4000:]}"
    doc = json.loads(res.stdout)
    assert doc == json.loads(out.read_text())
    brief = {k: v for k, v in doc.items() if k not in ("events", "app", "machine")}
    why = f"{json.dumps(brief, indent=1)}\n{res.stderr[-3000:]}"
    assert doc["seed"] == 1
    assert doc["lost"] == 0, why
    assert doc["duplicated"] == 0, why
    assert doc["state_errors"] == 0, why
    assert doc["stuck"] == 0, why
    assert sum(doc["faults"].values()) == 5, why
    assert len(doc["faults"]) == 5, f"not every kind of fault: {doc['faults']}"
    assert doc["records"] > 0 and doc["committed_rows"] == doc["records"], why
    # Every (key, window) of those records exactly once, with its count.
    assert doc["windows"] > 0 and doc["window_rows"] == doc["windows"], why
    assert doc["windows_lost"] == doc["windows_duplicated"] == 0, why
    assert doc["windows_wrong"] == doc["windows_beyond"] == 0, why
    assert res.returncode == 0, why


@pytest.mark.timeout(150)
def test_a_short_seeded_connectors_chaos_run_leaves_every_seq_once_in_postgres(
    tmp_path: Path,
) -> None:
    """``--connectors``: Redis stream -> count -> PostgreSQL (2PC) with redis-server and
    PostgreSQL killed and restarted among worker faults, and upgrades and rescales
    (source, count, sink) between them."""
    for name in ("redis-server", "initdb", "postgres"):
        try:
            servers.find_binary(name)
        except servers.ServerMissing as e:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI=true: {e}")
            pytest.skip(str(e))
    out = tmp_path / "chaos.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "chaos.py"),
        "--connectors",
        "--faults",
        "4",
        "--seed",
        "3",
        "--rate",
        "300",
        "--kinds",
        "redis_kill,postgres_kill,worker_kill,master_kill",
        "--settle-timeout",
        "20",
        "--data-dir",
        str(tmp_path / "run"),
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=130, cwd=ROOT)
    assert res.stdout.strip(), f"no JSON document (exit {res.returncode}):\n{res.stderr[-4000:]}"
    doc = json.loads(res.stdout)
    brief = {k: v for k, v in doc.items() if k not in ("events", "app", "machine")}
    why = f"{json.dumps(brief, indent=1)}\n{res.stderr[-3000:]}"
    assert doc["faults"] == {
        "redis_kill": 1,
        "postgres_kill": 1,
        "worker_kill": 1,
        "master_kill": 1,
    }
    assert doc["records"] > 0 and doc["committed_rows"] == doc["records"], why
    assert doc["lost"] == doc["duplicated"] == doc["state_errors"] == 0, why
    assert doc["stuck"] == 0, why
    assert doc["redis_stream_entries"] == doc["records"], why
    assert doc["redis_stream_seqs_twice"] == 0, why
    assert doc["pg_prepared_xacts"] == 0, why
    assert doc["redis_pending"] == 0, why
    assert doc["producer_reconnects"] > 0, "redis-server was never down for the producer"
    assert res.returncode == 0, why
