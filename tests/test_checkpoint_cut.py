"""A worker lost soon after an online upgrade: recovery restores one consistent cut.

The app counts records per key in a keyed class PE. After an upgrade and a
SIGKILL of a worker the app restarts from a checkpoint and the sources replay
what came after it; whatever checkpoint that is, the state restored must belong
to the same cut as the source positions: the final count of every key equals
the number of records of that key, never more (counted twice) or less (lost).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from hotwire.master.cut import states_for_restart
from hotwire.plan import key_partition
from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import SCENARIOS, render

N = 9000
RATE = 3000.0
KEYS = 16


def _final_counts(rows: list[dict]) -> dict[str, int]:
    last: dict[str, int] = {}
    for r in rows:
        last[r["key"]] = r["n"]
    return last


@pytest.mark.parametrize(
    ("scenario", "delay"),
    [("change_code", 0.0), ("replace_source", 0.0), ("rescale_keyed", 0.3), ("insert_pe", 0.0)],
)
def test_recovery_after_an_upgrade_restores_one_cut(
    tmp_path: Path, scenario: str, delay: float
) -> None:
    import time

    v1, v2 = SCENARIOS[scenario]
    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    kw = {"out": str(out), "audit": str(audit), "n": N, "rate": RATE, "keys": KEYS}
    app1 = write_app(tmp_path, "v1.py", render(v1, **kw))
    app2 = write_app(tmp_path, "v2.py", render(v2, **kw))
    with LocalCluster(
        data_dir=tmp_path / "cluster", heartbeat_timeout=1.0, checkpoint_interval=0.5
    ) as c:
        c.client.submit(app1)
        poll_for(lambda: count_lines(out) > N // 3, 20, what="records before the upgrade")
        assert c.client.upgrade(app2).applied
        time.sleep(delay)
        c.kill_worker("w2")
        poll_for(
            lambda: {r["seq"] for r in read_jsonl(out)} >= set(range(N)),
            40,
            what="every record after the recovery",
        )
        # Let the last replayed records land.
        poll_for(lambda: c.client.status("upg").apps[0].state == "running", 10, what="running")
    rows = read_jsonl(out)
    per_key = Counter(f"k{s % KEYS}" for s in range(N))
    final = _final_counts(rows)
    wrong = {k: (final.get(k), per_key[k]) for k in per_key if final.get(k) != per_key[k]}
    assert not wrong, f"final count != records of the key (final, expected): {wrong}"


def test_a_cut_maps_onto_new_instances_by_pe_and_key() -> None:
    cut = {
        "src@1.0": {"position": 700},
        # Keyed state as keyed_wire() packs it: a dict when its keys come back from
        # msgpack as themselves, [key, value] pairs when one does not (a tuple).
        "count@1.0": {k: k * 10 for k in range(0, 40, 2)},
        "count@1.1": [[k, k * 10] for k in range(1, 40, 2)] + [[[1, "a"], 5]],
        "plain@2.0": {"a": 1},
        "plain@2.1": {"b": 2},
        "plain@2.2": None,
        "gone@1.0": [1, 2, 3],
    }
    # The source was replaced (generation 2 now), count rescaled 2 -> 3, plain 3 -> 2,
    # "gone" removed and "new" inserted since the cut.
    out = states_for_restart(
        cut,
        {"src": 1, "count": 3, "plain": 2, "new": 1},
        {"src": False, "count": True, "plain": False, "new": False},
    )
    assert out[("src", 0)] == [{"position": 700}], "positions belong to the cut"
    pairs = {i: out[("count", i)][0] for i in range(3)}
    assert sorted(k if isinstance(k, int) else -1 for p in pairs.values() for k, _ in p) == [
        -1,
        *range(40),
    ]
    for i, part in pairs.items():
        for k, v in part:
            key = tuple(k) if isinstance(k, list) else k
            assert key_partition(key, 3) == i
            assert v == (5 if key == (1, "a") else key * 10)
    assert out[("plain", 0)] == [{"a": 1}] and out[("plain", 1)] == [{"b": 2}]
    assert not any(pe in ("gone", "new") for pe, _ in out)
    same = states_for_restart({"count@1.0": [[1, 1]], "count@1.1": [[2, 2]]}, {"count": 2}, {})
    assert same == {("count", 0): [[[1, 1]]], ("count", 1): [[[2, 2]]]}


def test_checkpoints_in_flight_across_back_to_back_upgrades(tmp_path: Path) -> None:
    """Checkpoints every 0.1 s and upgrades one after another: a checkpoint the master
    abandons at a switch must neither hold a channel forever nor let a replacing
    channel overtake records held on the channel it replaces."""
    from hotwire.testing.scenarios import check_output

    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    kw = {"out": str(out), "audit": str(audit), "n": N, "rate": RATE, "keys": KEYS}
    base, wide = SCENARIOS["rescale_keyed"]
    code2 = SCENARIOS["change_code"][1]
    apps = [
        write_app(tmp_path, f"v{i}.py", render(shape, **kw))
        for i, shape in enumerate([base, wide, base, code2, wide], 1)
    ]
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.1) as c:
        c.client.submit(apps[0])
        poll_for(lambda: count_lines(out) > N // 5, 20, what="records before the upgrades")
        for app in apps[1:]:
            assert c.client.upgrade(app).applied
        assert count_lines(out) < N, "the upgrades must happen while records flow"
        poll_for(lambda: count_lines(out) >= N, 40, what="every record after the upgrades")
    v = check_output(read_jsonl(out), N)
    assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v
    assert not v.problems, v.problems
