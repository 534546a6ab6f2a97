"""Metrics that follow records and state on a real cluster: the end-to-end latency
from a source's stamp to a sink, and the state bytes handed over on one worker."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from hotwire.testing.cluster import LocalCluster, poll_for, write_app

RATE = 400  # records per second from each app's source

E2E_APP = """
import asyncio

from hotwire import Topology
from hotwire.testing.sources import counter

async def slow(r):
    await asyncio.sleep({sleep})  # the sink's own time per record (0: none)

app = Topology("{name}")
app.source("src", counter(rate={rate})).map("m", lambda r: {{**r, "m": 1}}).sink("snk", slow)
"""


def _scrape(addr: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _e2e(c: LocalCluster, app: str) -> tuple[float, float]:
    """(count, sum) of ``app``'s hotwire_e2e_latency_seconds over every worker."""
    count = total = 0.0
    for label, addr in c.metrics_addresses.items():
        if label == "master":
            continue
        fam = _scrape(addr).get("hotwire_e2e_latency_seconds")
        for s in fam.samples if fam else ():
            if s.labels.get("app") != app:
                continue
            assert s.labels["pe"] == "snk", s  # only sinks measure
            if s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_sum"):
                total += s.value
    return count, total


def test_e2e_latency_at_sinks_grows_with_a_slow_sink(tmp_path: Path) -> None:
    """src -> m -> snk placed across two workers (m with src on w1, snk on w2: a local
    channel, then a remote one); two apps at once, one whose sink sleeps 5 ms a record
    (about half the source's rate): its batches wait behind the sink, so its latency
    is many times the other's."""
    with LocalCluster(workers=2, data_dir=tmp_path / "c", metrics=True) as c:
        started = time.monotonic()
        for name, sleep in (("fast", 0), ("slow", 0.005)):
            body = E2E_APP.format(name=name, rate=RATE, sleep=sleep)
            c.streamctl("submit", write_app(tmp_path, f"{name}.py", body)).check_returncode()
            status = json.loads(c.streamctl("status", name, "--json").stdout)
            where = {p["name"]: {i["worker"] for i in p["instances"]} for p in status["pes"]}
            assert where["src"] == where["m"] and where["src"] != where["snk"], where

        # Enough stamped batches at both sinks (the slow one gets its share too).
        poll_for(
            lambda: _e2e(c, "fast")[0] >= 200 and _e2e(c, "slow")[0] >= 50,
            60,
            0.5,
            what="stamped batches counted at both sinks",
        )
        fast_n, fast_sum = _e2e(c, "fast")
        slow_n, slow_sum = _e2e(c, "slow")
        elapsed = time.monotonic() - started
        fast, slow = fast_sum / fast_n, slow_sum / slow_n
        assert 0 < fast < elapsed, (fast, elapsed)
        assert 0 < slow < elapsed, (slow, elapsed)
        assert slow > 5 * fast, (slow, fast)
        # The count keeps growing while records flow.
        poll_for(lambda: _e2e(c, "fast")[0] > fast_n, 20, 0.5, what="the count to grow")
        # The stamp crossed the data plane: w2's sink has only remote input.
        w2 = _scrape(c.metrics_addresses["w2"])
        received = sum(s.value for s in w2["hotwire_dataplane_received_frames"].samples)
        assert received > 0
