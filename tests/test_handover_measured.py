"""What an upgrade's switch hands over, as the workers count it at the handover,
on a real two-worker cluster: every key of the keyed PE (all seen before the
upgrade) and its bytes, in the upgrade's reply, in ``streamctl upgrade --json``
and in ``streamctl history``; the records stay exactly once.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from hotwire.testing import read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import BASE, check_output, render

KEYS = 400
N = 30000
RATE = 2000.0


def _keys_seen(out: Path) -> int:
    try:
        return len({r["key"] for r in read_jsonl(str(out))})
    except FileNotFoundError:
        return 0


def _count_entry(handover_json: str) -> dict[str, int]:
    [count] = [h for h in json.loads(handover_json) if h["pe"] == "count"]
    return count


def test_every_key_and_its_bytes_are_counted_at_the_handover(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    shapes = [BASE, replace(BASE, count_code=2), replace(BASE, count_code=2, count_p=3)]
    apps = [
        write_app(
            tmp_path,
            f"v{i + 1}.py",
            render(s, out=str(out), audit=str(audit), n=N, rate=RATE, keys=KEYS),
        )
        for i, s in enumerate(shapes)
    ]
    cluster.client.submit(apps[0])
    poll_for(lambda: _keys_seen(out) == KEYS, 30, what=f"all {KEYS} keys at the sink")
    # the smallest the state of 400 keys can be: per key its name and a count
    least = sum(len(f"k{i}") + 2 for i in range(KEYS))

    # the same parallelism: each instance hands its state whole to one successor,
    # and one (empty) handover to the other
    same = cluster.client.upgrade(apps[1])
    assert same.applied
    c = _count_entry(same.handover_json)
    assert (c["keys"], c["handovers"]) == (KEYS, 4), c
    assert c["bytes"] >= least, c

    # 2 -> 3 instances, through streamctl: the keys split over the three, every one
    # still counted once
    res = cluster.streamctl("upgrade", apps[2], "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    [c] = [h for h in doc["handed_over"] if h["pe"] == "count"]
    assert (c["keys"], c["handovers"]) == (KEYS, 6), c
    assert c["bytes"] >= least, c
    assert 0 <= c["local"] <= 6

    hist = cluster.streamctl("history", "upg")
    assert hist.returncode == 0, hist.stderr
    lines = [x.strip() for x in hist.stdout.splitlines() if "handed over: 'count'" in x]
    assert len(lines) == 2, hist.stdout
    assert all(x.startswith(f"handed over: 'count': {KEYS} keys, ") for x in lines), lines
    stored = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
    handed = [v["changes"].get("handed_over") for v in stored["versions"]]
    assert [h[0]["keys"] if h else None for h in handed[1:]] == [KEYS, KEYS], handed

    poll_for(lambda: len(read_jsonl(str(out))) >= N, 60, what="every record at the sink")
    v = check_output(read_jsonl(str(out)), N)
    assert (v.lost, v.duplicated, v.state_resets) == (0, 0, 0), v
