"""The state compatibility check of an upgrade's prepare phase, on a real cluster.

A class PE declares ``state_version``, ``migrate(state, from_version)`` and
``validate_state(state)``. Before anything switches, every new instance that
takes over state tries the new code on a sample of the last checkpoint's state;
``streamctl upgrade --dry-run`` runs the same check without touching the app.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hotwire.codec import hashable_key, packb, unpackb
from hotwire.master.cut import checkpoint_samples, decode_thinned, state_samples, states_for_restart
from hotwire.pe.executors import _keyed_items
from hotwire.pe.state import keyed_pairs, keyed_wire, unwrap, wrap
from hotwire.plan import key_partition
from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import BASE, check_output, read_exact, render

N = 9000
RATE = 3000.0

OLD_COUNT = """    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n.update(state)
"""

# Version 2 keeps {"n": count} per key instead of a bare count.
NEW_PROCESS = '        n = self.n.get(k, {"n": 0})["n"] + 1\n        self.n[k] = {"n": n}\n'
NEW_RESTORE = """    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n.update({k: {"n": v["n"]} for k, v in state.items()})
"""
MIGRATE = """    state_version = 2

    def migrate(self, state, from_version):
        assert from_version == 1, from_version
        return {k: {"n": v} for k, v in state.items()}

"""


def _v1(tmp_path: Path, out: Path) -> str:
    return render(BASE, out=str(out), audit=str(tmp_path / "audit.jsonl"), n=N, rate=RATE)


def _v2(base: str, *, migrate: bool, extra: str = "") -> str:
    """Version 2 of the count PE: new state shape; with ``migrate``, a migrate hook."""
    src = base.replace(
        "        n = self.n.get(k, 0) + 1\n        self.n[k] = n\n", NEW_PROCESS
    ).replace('"code": 1', '"code": 2')
    src = src.replace(OLD_COUNT, NEW_RESTORE + extra)
    if migrate:
        src = src.replace("class Count(ProcessPE):\n", "class Count(ProcessPE):\n" + MIGRATE)
    assert src.count(NEW_PROCESS) == 1 and NEW_RESTORE in src, src
    return src


def _running_with_checkpoint(cluster: LocalCluster, app: str, out: Path) -> None:
    cluster.client.submit(app)
    poll_for(lambda: count_lines(out) > N // 4, 20, what="records flowing")
    poll_for(
        lambda: cluster.client.status("upg").apps[0].last_checkpoint > 0,
        20,
        what="a checkpoint of the running version",
    )


def _gens(cluster: LocalCluster) -> dict[str, int]:
    return {p.name: p.gen for p in cluster.client.status("upg").apps[0].pes}


def test_incompatible_state_is_refused_in_prepare(cluster: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    base = _v1(tmp_path, out)
    _running_with_checkpoint(cluster, write_app(tmp_path, "v1.py", base), out)
    gens = _gens(cluster)
    # The new restore reads v["n"] of the old bare counts: TypeError on every key.
    bad = write_app(tmp_path, "v2.py", _v2(base, migrate=False))
    res = cluster.streamctl("upgrade", bad)
    assert res.returncode == 1, (res.stdout, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "PE 'count'" in err and "cannot take over the state" in err, err
    assert "key 'k" in err and "TypeError" in err, err
    st = cluster.client.status("upg").apps[0]
    assert st.version == 1 and _gens(cluster) == gens, "nothing may have switched"
    assert len(cluster.client.history("upg").versions) == 1
    rows = read_exact(out, N, 30)
    assert {r["code"] for r in rows} == {1}, "the old version keeps running"


def test_migrate_carries_state_across_a_schema_change(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    base = _v1(tmp_path, out)
    _running_with_checkpoint(cluster, write_app(tmp_path, "v1.py", base), out)
    v2 = _v2(base, migrate=True)
    before = cluster.client.status("upg").apps[0].last_checkpoint
    r = cluster.client.upgrade(write_app(tmp_path, "v2.py", v2))
    assert r.applied and (r.from_version, r.to_version) == (1, 2)
    assert "PE 'count'" in r.state_check and "keys of checkpoint" in r.state_check, r
    assert count_lines(out) < N, "the upgrade must happen while records flow"
    rows = read_exact(out, N, 30)
    assert rows[-1]["code"] == 2, "the new code must be live"
    # The migrated state checkpoints as version 2: a code change that keeps
    # state_version 2 and has no migrate takes it over unchanged.
    poll_for(
        lambda: cluster.client.status("upg").apps[0].last_checkpoint > before,
        20,
        what="a checkpoint of version 2",
    )
    v3 = v2.replace(MIGRATE, "    state_version = 2\n\n").replace('"code": 2', '"code": 3')
    assert v3 != v2
    res = cluster.streamctl("upgrade", write_app(tmp_path, "v3.py", v3), "--dry-run")
    assert res.returncode == 0 and "state check: passed" in res.stdout, (res.stdout, res.stderr)


def test_dry_run_reports_incompatible_state_and_changes_nothing(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    base = _v1(tmp_path, out)
    _running_with_checkpoint(cluster, write_app(tmp_path, "v1.py", base), out)
    gens = _gens(cluster)
    bad = write_app(tmp_path, "v2.py", _v2(base, migrate=False))
    res = cluster.streamctl("upgrade", bad, "--dry-run")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "dry run: nothing applied" in res.stdout and "state check:" in res.stdout
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "would fail" in err and "PE 'count'" in err and "TypeError" in err, err
    # A validate_state that refuses is reported the same way.
    refusing = _v2(
        base,
        migrate=True,
        extra="\n    def validate_state(self, state):\n        return False\n",
    )
    res = cluster.streamctl("upgrade", write_app(tmp_path, "v3.py", refusing), "--dry-run")
    assert res.returncode == 1 and "validate_state() refused" in res.stderr, res.stderr
    # The compatible version passes the same check.
    good = write_app(tmp_path, "v4.py", _v2(base, migrate=True))
    res = cluster.streamctl("upgrade", good, "--dry-run")
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "state check: passed: PE 'count'" in res.stdout, res.stdout
    st = cluster.client.status("upg").apps[0]
    assert st.version == 1 and _gens(cluster) == gens
    assert len(cluster.client.history("upg").versions) == 1
    poll_for(lambda: count_lines(out) >= N, 30, what="every record")
    v = check_output(read_jsonl(out), N)
    assert v.ok and not v.problems, v


def test_versioned_keyed_state_splits_inside_its_envelope() -> None:
    pairs = [[f"k{i}", i] for i in range(50)]
    cut = {"count@3.0": wrap(pairs[:25], 2), "count@3.1": wrap(pairs[25:], 2), "src@1.0": None}
    mapped = states_for_restart(cut, {"count": 3}, {"count": True})
    seen = []
    for (pe, i), states in mapped.items():
        for s in states:
            state, version = unwrap(s)
            assert (pe, version) == ("count", 2)
            assert all(key_partition(k, 3) == i for k, _ in state)
            seen += state
    assert sorted(seen) == sorted(pairs)
    # A renamed successor samples its predecessor's state, at most `limit` keys each.
    samples = state_samples(cut, {"total": (frozenset({"count"}), 2, True)}, limit=10)
    assert set(samples) == {("total", 0), ("total", 1)}
    for states in samples.values():
        (s,) = states
        state, version = unwrap(s)
        assert version == 2 and len(state) == 10


@pytest.mark.parametrize("version", [1, 2])
def test_checkpoint_samples_decode_only_what_the_check_tries(version: int) -> None:
    pairs = [[f"k{i}", i] for i in range(5000)]
    cut = {
        "count@3.0": wrap(pairs[:2500], version),
        "count@3.1": wrap(pairs[2500:], version),
        "src@1.0": {"position": 7, "instance": 0, "of": 1},
        "sink@1.0": None,
    }
    blob = packb({iid: packb(s) for iid, s in cut.items()})
    # The same parallelism: exactly the sample drawn from the whole decoded cut.
    takers = {"count": (frozenset({"count"}), 2, True)}
    assert checkpoint_samples(blob, takers, limit=100) == state_samples(cut, takers, limit=100)
    # Another parallelism: each part holds real keys it owns, at most `limit`, in
    # the writer's version envelope.
    for n in (1, 3, 5):
        samples = checkpoint_samples(blob, {"count": (frozenset({"count"}), n, True)}, limit=100)
        assert set(samples) == {("count", i) for i in range(n)}
        for (_pe, i), states in samples.items():
            keys = 0
            for s in states:
                state, v = unwrap(s)
                assert v == version
                assert all(key_partition(k, n) == i and [k, c] in pairs for k, c in state)
                keys += len(state)
            assert 80 <= keys <= 100, (n, i, keys)
    # An unkeyed taker gets every state whole.
    whole = checkpoint_samples(blob, {"count": (frozenset({"count"}), 2, False)}, limit=100)
    assert whole == state_samples(cut, {"count": (frozenset({"count"}), 2, False)}, limit=100)


@pytest.mark.parametrize(
    ("state", "thinned"),
    [
        ([[f"k{i}", {"n": i}] for i in range(300)], True),
        ({"__hotwire_state_version__": 3, "state": [[[1, "a"], i] for i in range(300)]}, True),
        ({"state": [[1, 2]] * 300, "other": 1}, False),  # not a version envelope
        (list(range(300)), False),  # not pairs
        ([[1, 2]] * 50 + [[1, 2, 3]] * 250, False),  # a kept element is not a pair
        ([[1, 2]] * 20, False),  # short: whole
        ({f"k{i}": i for i in range(300)}, True),  # a keyed dict (keyed_wire)
        ({"__hotwire_state_version__": 2, "state": {i: [i] for i in range(300)}}, True),
        ({"a": 1}, False),  # a short keyed dict: whole, as pairs
        (None, False),
        ([], False),
    ],
)
def test_decode_thinned_reads_evenly_spread_pairs_or_the_whole_state(
    state: object, thinned: bool
) -> None:
    got = decode_thinned(packb(state), 30)
    bare, version = unwrap(state)
    if thinned:
        pairs = keyed_pairs(bare)
        assert unwrap(got) == ([pairs[j * 10] for j in range(30)], version)
    elif isinstance(state, dict) and "other" not in state:
        assert got == keyed_pairs(state)
    else:
        assert got == state


@pytest.mark.parametrize(
    ("state", "as_dict"),
    [
        ({"a": 1, 2: [3], -7: None, 1.5: {"x": 1}, b"k": 1, None: 0, True: "t"}, True),
        ({("a", 1): 1, "b": 2}, False),  # a tuple key packs as an array
        ({"__hotwire_state_version__": 1, "state": 2}, False),  # never an envelope
        ({}, True),
    ],
)
def test_keyed_state_travels_as_a_dict_only_when_its_keys_come_back(
    state: dict[object, object], as_dict: bool
) -> None:
    wire = keyed_wire(state)
    assert isinstance(wire, dict) == as_dict
    back = unpackb(packb(wire))
    assert unwrap(back) == (back, 1)
    assert dict(_keyed_items(back)) == state
    assert {hashable_key(k): v for k, v in keyed_pairs(back)} == state



@pytest.mark.parametrize("version", [1, 2])
def test_state_version_envelope_round_trips(version: int) -> None:
    state = {"a": 1}
    assert unwrap(wrap(state, version)) == (state, version)
    assert (wrap(state, version) is state) == (version == 1), "version 1 travels bare"
