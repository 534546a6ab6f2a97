"""Same-worker PEs run as a chain: a batch goes through them in the sender's task.

A same-worker receiver that is idle takes a batch in the sender's task
(``Instance.take_inline``) instead of through its inbox; these tests check that
this happens, and that it keeps what the inbox kept: every record once and in
order through an online upgrade of a PE in the middle of the chain, and a fan-out
whose receivers mutate their input without seeing each other's changes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import (
    LocalCluster,
    poll_for,
    scrape_metrics,
    upgrade_under_load,
    write_app,
)

N = 20_000

_CHAIN = """
import asyncio
from hotwire import Topology
from hotwire.testing import counter, file_sink

write = file_sink({out!r})


def task():
    return asyncio.current_task().get_name()


def tag(r):
    return {{**r, "v": {v}, "map_task": task()}}


def sink(r):
    write({{**r, "sink_task": task()}})


app = Topology("chain")
src = app.source("src", counter(n={n}, rate=8000))
src.map("m", tag).filter("f", lambda r: True).sink("out", sink)
"""


def test_a_chain_runs_in_the_source_task_and_keeps_order_through_an_upgrade(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"
    v1 = write_app(tmp_path, "v1.py", _CHAIN.format(out=str(out), n=N, v=1))
    v2 = write_app(tmp_path, "v2.py", _CHAIN.format(out=str(out), n=N, v=2))
    with LocalCluster(workers=1, data_dir=tmp_path / "cluster", metrics=True) as c:
        c.client.submit(v1)
        upgrade_under_load(c.client, v2, out, N)
        poll_for(lambda: count_lines(out) >= N, 30, what="every record at the sink")

        def sink_status() -> dict[str, Any] | None:
            st = json.loads(c.streamctl("status", "chain", "--json").stdout)
            [snk] = [p for p in st["pes"] if p["name"] == "out"]
            return snk if snk["instances"][0]["batches"] else None

        # status says how much of a PE's input came through a chain
        snk = poll_for(sink_status, 10, what="the sink's batches in status")
        [inst] = snk["instances"]
        assert 0 < inst["chained"] <= inst["batches"], inst
        assert snk["chained"] == round(inst["chained"] / inst["batches"], 3) > 0.5, snk
        assert "chained" in c.streamctl("status", "chain").stdout
        # and Prometheus: the sink's chained batches, against the batches it processed
        families = scrape_metrics(c.metrics_addresses["w1"])
        [chained] = [
            x.value for x in families["hotwire_chained_batches"].samples if x.labels["pe"] == "out"
        ]
        [processed] = [
            x.value
            for x in families["hotwire_batch_process_seconds"].samples
            if x.labels["pe"] == "out" and x.name.endswith("_count")
        ]
        # (a marker batch, such as the source's last watermark, is taken, not processed)
        assert processed / 2 < chained <= processed + 1, (chained, processed)
    rows = read_jsonl(out)
    seqs = [row["seq"] for row in rows]
    assert Counter(seqs) == Counter(range(N)), "a record lost or duplicated"
    assert seqs == sorted(seqs), "out of order"
    versions = [row["v"] for row in rows]
    assert versions == sorted(versions) and versions[-1] == 2, "old code after new"
    # Before the upgrade the map and the sink ran in the source's task: one chain.
    first = rows[: N // 8]
    assert {row["map_task"] for row in first} == {"chain/src@1.0"}, first[0]
    assert {row["sink_task"] for row in first} == {"chain/src@1.0"}, first[0]
