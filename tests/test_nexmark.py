"""Nexmark Q0-Q8 on a real two-worker cluster: every query's results equal its
plain-Python reference over the same events (the exact multiset), with one
source instance and with a source split in parts (one per instance, each its own
timestamp assigner); and through an online change of Q5's aggregation code and
a rescale of Q7's window PE in the middle of a run, the results still equal the
reference and those fired after each switch carry the new version. The
generator's parts together are exactly the unsplit events."""

from __future__ import annotations

import sys
from pathlib import Path

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import pytest  # noqa: E402
from nexmark.generator import CHUNK, events, part_size  # noqa: E402
from nexmark.queries import QUERIES, VARIANTS  # noqa: E402
from nexmark.reference import normalise, reference  # noqa: E402

INCLUDE = str(EXAMPLES / "nexmark")

APP = """
from nexmark.queries import build, count_v1, count_v2

app = build({name!r}, {out!r}, {n}, queries={queries!r}, rate={rate!r},
            q5_count={q5}, q7_parallelism={p7}, parallelism={par})
"""


def _app(
    tmp: Path,
    file: str,
    name: str,
    n: int,
    queries: list[str],
    rate: float | None,
    q5: str = "count_v1",
    p7: int = 1,
    par: int = 1,
) -> str:
    body = APP.format(
        name=name, out=str(tmp), n=n, queries=queries, rate=rate, q5=q5, p7=p7, par=par
    )
    return write_app(tmp, file, body)


def _results(path: Path) -> list[dict]:
    return [r for _t, r in read_jsonl(path)]


@pytest.mark.parametrize(("n", "parts"), [(8000, 1), (12345, 3)])
def test_generator_parts_are_the_events(n: int, parts: int) -> None:
    whole = list(events(n))
    assert [e["date_time"] for e in whole] == sorted(e["date_time"] for e in whole)
    split = [list(events(n, part=i, parts=parts)) for i in range(parts)]
    assert [len(s) for s in split] == [part_size(n, i, parts) for i in range(parts)]
    for s in split:  # each part in order: its own assigner needs no out-of-orderness
        assert [e["date_time"] for e in s] == sorted(e["date_time"] for e in s)
    merged = sorted((e for s in split for e in s), key=lambda e: e["date_time"])
    assert merged == whole
    for p in (2, 3):
        parts_p = [e for i in range(p) for e in events(n, part=i, parts=p)]
        assert sorted(parts_p, key=lambda e: e["date_time"]) == whole, f"{p} parts"
    # A part resumed at a position yields the rest of that part, mid-chunk too.
    for skip in (0, CHUNK - 1, CHUNK + 7):
        assert (
            list(events(n, part=1, parts=2, skip=skip)) == list(events(n, part=1, parts=2))[skip:]
        )
    expires = [e["expires"] for e in whole if e["kind"] == "auction"]
    assert len(expires) == len(set(expires)), "two auctions close in the same millisecond"


def test_every_query_equals_its_reference(tmp_path: Path) -> None:
    # 35 PE instances: more than the 16 slots a worker of the shared fixture has.
    c = LocalCluster(workers=2, slots=24, data_dir=tmp_path / "cluster", heartbeat_timeout=3.0)
    with c:
        _every_query(c, tmp_path, 1)
        died = [p.label for p in [c.master, *c.workers] if p and p.proc.poll() is not None]
        assert not died, f"processes died during the test: {died}\n{c.logs()}"


def test_every_query_with_a_split_source_equals_its_reference(tmp_path: Path) -> None:
    # The source, its assigners and filters, Q0-Q2 and Q5 in 3 instances on 2 workers:
    # a PE downstream takes the least watermark of the 3 parts, so no window fires
    # before every part passed its end.
    c = LocalCluster(workers=2, slots=40, data_dir=tmp_path / "cluster", heartbeat_timeout=3.0)
    with c:
        _every_query(c, tmp_path, 3)
        died = [p.label for p in [c.master, *c.workers] if p and p.proc.poll() is not None]
        assert not died, f"processes died during the test: {died}\n{c.logs()}"


def _every_query(cluster: LocalCluster, tmp_path: Path, par: int) -> None:
    n = 8000
    queries = QUERIES + list(VARIANTS)
    ev = list(events(n))
    expected = {q: reference(q, ev) for q in queries}
    assert all(expected.values()), "every query has results over these events"
    cluster.client.submit(
        _app(tmp_path, "all.py", "nexmark", n, queries, None, par=par), include=INCLUDE
    )
    for q in queries:
        poll_for(
            lambda q=q: count_lines(tmp_path / f"{q}.jsonl") >= len(expected[q]),
            60,
            what=f"{len(expected[q])} results of {q}",
        )
    # The final watermark has fired every window: a surplus would show now.
    cluster.client.kill("nexmark")
    for q in queries:
        got = normalise(_results(tmp_path / f"{q}.jsonl"))
        assert got == expected[q], f"{q}: {len(got)} results, {len(expected[q])} expected; " + str(
            sorted(set(got) ^ set(expected[q]))[:3]
        )


def test_q5_code_change_and_q7_rescale_online(cluster: LocalCluster, tmp_path: Path) -> None:
    n, rate = 9000, 1500.0
    qs = ["q5", "q7"]
    ev = list(events(n))
    expected = {q: reference(q, ev) for q in qs}
    q5, q7 = tmp_path / "q5.jsonl", tmp_path / "q7.jsonl"

    def app(file: str, count: str, p7: int) -> str:
        return _app(tmp_path, file, "nexmark-up", n, qs, rate, q5=count, p7=p7)

    cluster.client.submit(app("v1.py", "count_v1", 1), include=INCLUDE)
    poll_for(lambda: count_lines(q5) >= 6, 30, what="q5 results before the code change")
    r = cluster.client.upgrade(app("v2.py", "count_v2", 1), include=INCLUDE)
    assert r.applied and r.to_version == 2
    poll_for(lambda: count_lines(q7) >= 3, 30, what="q7 results before the rescale")
    r = cluster.client.upgrade(app("v3.py", "count_v2", 2), include=INCLUDE)
    assert r.applied and r.to_version == 3
    assert count_lines(q7) < len(expected["q7"]), "the rescale must happen while windows fire"
    for q in qs:
        poll_for(
            lambda q=q: count_lines(tmp_path / f"{q}.jsonl") >= len(expected[q]),
            60,
            what=f"every {q} result",
        )
    cluster.client.kill("nexmark-up")
    rows = {q: _results(tmp_path / f"{q}.jsonl") for q in qs}
    for q in qs:
        assert normalise(rows[q]) == expected[q], f"{q} differs from the reference"
    v5 = [r["version"] for r in rows["q5"]]
    assert v5[0] == 1 and v5[-1] == 2 and v5 == sorted(v5), v5
    v7 = [r["version"] for r in rows["q7"]]
    assert v7[0] == 1 and v7[-1] == 3 and v7 == sorted(v7), v7
