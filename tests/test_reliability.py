"""Overload and user errors on a real local cluster: a slow sink slows the source
(bounded memory, nothing dropped), and each ``on_error`` policy keeps the worker up
and reports what failed."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hotwire import Topology
from hotwire.sdk import ValidationError
from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.worker.channels import CREDITS
from hotwire.worker.instance import SOURCE_BATCH


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _pe(cluster: LocalCluster, app: str, pe: str) -> dict[str, Any]:
    res = cluster.streamctl("status", app, "--json")
    assert res.returncode == 0, res.stderr
    return next(p for p in json.loads(res.stdout)["pes"] if p["name"] == pe)


# ---------------------------------------------------------------------------
# Overload: credits give backpressure
# ---------------------------------------------------------------------------


def test_slow_sink_slows_the_source_with_bounded_memory(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    n = 40_000
    slow, out, pulled = tmp_path / "slow", tmp_path / "out.txt", tmp_path / "pulled"
    slow.touch()  # while it exists the sink sleeps 1 ms per record (10x+ slower than the source)
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        import os, time
        from hotwire import Topology
        from hotwire.testing import counter

        records = counter(n={n}, payload=1000)

        async def src(ctx):
            k = 0
            async for r in records(ctx):
                yield r
                k += 1
                if k % 256 == 0:  # how far the runtime has pulled the source
                    with open({str(pulled)!r}, "w") as f:
                        f.write(str(k))

        _out = []

        def sink(r):
            if os.path.exists({str(slow)!r}):
                time.sleep(0.001)
            if not _out:
                _out.append(open({str(out)!r}, "a", buffering=1))
            _out[0].write(f"{{r['seq']}}\\n")

        app = Topology("overload")
        app.source("src", src).map("m", lambda r: r, parallelism=2).sink("out", sink)
    """,
    )
    pids = [w.proc.pid for w in cluster.workers]
    cluster.client.submit(app)
    # src -> m: 2 channels, m -> out: 2 channels; each holds at most CREDITS batches.
    channels = 4
    bound = CREDITS * SOURCE_BATCH * channels + SOURCE_BATCH * (channels + 2)

    def src_count() -> int:
        try:
            return int(pulled.read_text() or 0)
        except FileNotFoundError:
            return 0

    poll_for(lambda: count_lines(out) > 200, 10, what="records at the slow sink")
    rss_start = [_rss_mib(p) for p in pids]
    gaps, ages = [], []
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        s = src_count()
        gaps.append(s - count_lines(out))
        ages += [w.last_heartbeat_age_s for w in cluster.client.workers().workers]
        time.sleep(0.25)
    rss_end = [_rss_mib(p) for p in pids]
    sunk = count_lines(out)
    assert src_count() < n // 2, "the source ran ahead of the slow sink"
    assert max(gaps) <= bound, f"in flight {max(gaps)} > credit bound {bound}"
    assert sunk > 1000, f"the slow sink should still move (~1000 rec/s), got {sunk}"
    assert max(ages) < 2.0, f"a busy worker missed heartbeats: ages up to {max(ages):.2f}s"
    assert all(end - start < 16 for start, end in zip(rss_start, rss_end, strict=True)), (
        f"worker RSS grew: {rss_start} -> {rss_end} MiB"
    )
    assert all(r < 200 for r in rss_end), f"worker RSS {rss_end} MiB"
    slow.unlink()
    poll_for(lambda: count_lines(out) >= n, 30, what="every record at the sink")
    seqs = Counter(int(x) for x in out.read_text().split())
    assert set(seqs) == set(range(n)) and max(seqs.values()) == 1


# ---------------------------------------------------------------------------
# User errors: on_error policies
# ---------------------------------------------------------------------------

POLICY_APP = """
    from hotwire import Topology
    from hotwire.testing import counter, file_sink

    def every_100th(r):
        if r["seq"] % 100 == 99:
            raise ValueError(f"bad record {{r['seq']}}")
        return r

    app = Topology({name!r})
    src = app.source("src", counter(n={n}))
    src.map("m", every_100th, parallelism=2, config={config!r}).sink("out", file_sink({out!r}))
"""


def _policy_app(tmp_path: Path, name: str, n: int, config: dict[str, Any]) -> tuple[str, Path]:
    out = tmp_path / f"{name}.jsonl"
    return write_app(
        tmp_path, f"{name}.py", POLICY_APP.format(name=name, n=n, config=config, out=str(out))
    ), out


def test_on_error_skip_and_dead_letter_keep_every_good_record(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    n = 3000
    bad = {s for s in range(n) if s % 100 == 99}
    skip_app, skip_out = _policy_app(tmp_path, "skipper", n, {})  # skip is the default
    dl_app, dl_out = _policy_app(tmp_path, "lettered", n, {"on_error": "dead_letter"})
    cluster.client.submit(skip_app)
    cluster.client.submit(dl_app)
    for out in (skip_out, dl_out):
        poll_for(lambda out=out: count_lines(out) >= n - len(bad), 20, what="every good record")
    for app in ("skipper", "lettered"):
        poll_for(
            lambda app=app: (
                sum(i["errors"] for i in _pe(cluster, app, "m")["instances"]) == len(bad)
            ),
            10,
            what=f"{app}: errors counted",
        )
    for out in (skip_out, dl_out):
        seqs = Counter(r["seq"] for r in read_jsonl(out))
        assert set(seqs) == set(range(n)) - bad and max(seqs.values()) == 1
    m = _pe(cluster, "lettered", "m")
    assert not m["failed"] and not any(i["failed"] for i in m["instances"])
    assert sum(i["dead_letters"] for i in m["instances"]) == len(bad)
    assert sum(i["dead_letters"] for i in _pe(cluster, "skipper", "m")["instances"]) == 0
    # Dead letters land in each worker's data dir: the record and the error, one JSON line each.
    letters = [
        row
        for w in cluster.workers
        for row in read_jsonl(cluster.dir / w.label / "dead-letter" / "lettered.m.jsonl")
    ]
    assert sorted(row["record"]["seq"] for row in letters) == sorted(bad)
    row = letters[0]
    assert row["app"] == "lettered" and row["pe"] == "m" and row["instance"] in (0, 1)
    assert row["error"] == f"ValueError: bad record {row['record']['seq']}"
    assert not (cluster.dir / "w1" / "dead-letter" / "skipper.m.jsonl").exists()
    log = "".join(w.log_path.read_text() for w in cluster.workers)
    assert "app 'skipper' PE 'm' instance" in log and "ValueError: bad record 99" in log
    assert all(w.proc.poll() is None for w in cluster.workers)


def test_on_error_fail_stops_the_instance_and_reports_it(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    app, out = _policy_app(tmp_path, "strict", 100_000, {"on_error": "fail"})
    cluster.client.submit(app)
    m = poll_for(
        lambda: (p := _pe(cluster, "strict", "m"))["failed"] and p,
        15,
        what="the PE reported failed",
    )
    failed = [i for i in m["instances"] if i["failed"]]
    assert failed and all(i["error"].startswith("ValueError: bad record ") for i in failed)
    assert all(i["errors"] == 1 for i in failed), "a failed instance processes nothing more"
    human = cluster.streamctl("status", "strict")
    assert human.returncode == 0 and "FAILED instance" in human.stdout, human.stdout
    # The failed instance holds its input: the source stops at the credit limit.
    src_out = lambda: _pe(cluster, "strict", "src")["instances"][0]["records_out"]  # noqa: E731

    def settled() -> int | None:  # the same over two heartbeats (status lags by one)
        first = src_out()
        time.sleep(1.2)
        return first if src_out() == first else None

    stopped = poll_for(settled, 30, interval=0, what="the source to stop")
    assert stopped < 100_000, "the source went on to the end"
    time.sleep(1.2)  # two heartbeats more: would show the source moving on
    assert src_out() == stopped
    rows = read_jsonl(out)
    assert len({r["seq"] for r in rows}) == len(rows), "a record was delivered twice"
    log = "".join(w.log_path.read_text() for w in cluster.workers)
    assert "(on_error='fail')" in log and "(record {'seq': " in log
    assert all(w.proc.poll() is None for w in cluster.workers)
    assert cluster.streamctl("kill", "strict").returncode == 0


def test_a_source_that_raises_is_reported_and_the_worker_stays_up(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology("crashy")
        src = app.source("src", counter(n=5000, crash_at=1234),
                         config={{"on_error": "dead_letter"}})
        src.map("m", lambda r: r).sink("out", file_sink({str(out)!r}))
    """,
    )
    cluster.client.submit(app)
    src = poll_for(
        lambda: (p := _pe(cluster, "crashy", "src"))["failed"] and p,
        15,
        what="the source reported failed",
    )
    inst = src["instances"][0]
    assert inst["errors"] == 1 and inst["dead_letters"] == 1
    assert inst["error"] == "RuntimeError: counter source crashed at seq 1234 as told (crash_at)"
    poll_for(lambda: count_lines(out) >= 1234, 10, what="what the source yielded before it raised")
    seqs = Counter(r["seq"] for r in read_jsonl(out))
    assert set(seqs) == set(range(1234)) and max(seqs.values()) == 1
    letters = read_jsonl(cluster.dir / inst["worker"] / "dead-letter" / "crashy.src.jsonl")
    assert len(letters) == 1 and letters[0]["position"] == 1234 and letters[0]["record"] is None
    assert all(w.proc.poll() is None for w in cluster.workers)
    # Still responsive: other apps run on the same workers.
    ok = write_app(
        tmp_path,
        "ok.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology("fine")
        app.source("src", counter(n=500)).sink("out", file_sink({str(tmp_path / "ok.jsonl")!r}))
    """,
    )
    cluster.client.submit(ok)
    poll_for(lambda: count_lines(tmp_path / "ok.jsonl") >= 500, 10, what="another app's records")


def test_an_unknown_on_error_policy_is_refused_by_the_sdk() -> None:
    app = Topology("policies")
    src = app.source("src", lambda ctx: iter(()))
    src.map("m", lambda r: r, config={"on_error": "explode"}).sink("out", print)
    with pytest.raises(
        ValidationError, match="PE 'm' of app 'policies': config on_error='explode' is not a policy"
    ):
        app.model()
