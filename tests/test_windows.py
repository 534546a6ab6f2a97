"""Event-time windows on a real two-worker cluster: results equal a plain-Python
reference, through an online code change and a rescale of the windowed PE;
late records reach the side output; a late record within the allowed lateness
fires its window again."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

N = 6000
RATE = 1500.0
KEYS = 7
SIZE = 100


def _t(seq: int) -> int:
    """The event time of record ``seq``: out of order by up to 4."""
    return seq - (seq * 7919) % 5


def _reference() -> dict[tuple[str, int], list[int]]:
    """(key, window start) -> [count, sum of seq % 10], computed in plain Python."""
    out: dict[tuple[str, int], list[int]] = {}
    for seq in range(N):
        w = out.setdefault((f"k{seq % KEYS}", _t(seq) // SIZE * SIZE), [0, 0])
        w[0] += 1
        w[1] += seq % 10
    return out


APP = """
from hotwire import Topology
from hotwire.sdk.windows import Tumbling
from hotwire.testing import counter, file_sink

OUT = file_sink({out!r})
LATE = file_sink({late!r})


def event_time(r):
    return r["seq"] - (r["seq"] * 7919) % 5


{agg}


app = Topology("win")
ts = app.source("src", counter(n={n}, rate={rate}, keys={keys})).assign_timestamps(
    "ts", event_time, out_of_orderness=5, parallelism={ts_p}
)
w = ts.key_by(lambda r: r["key"]).window(
    "win", Tumbling({size}), aggregate=agg, parallelism={p}
)
w.sink("out", OUT)
w.late().sink("late", LATE)
"""

AGG_V1 = """
def agg(acc, r):
    n, s = acc or (0, 0)
    return [n + 1, s + r["seq"] % 10]
"""

AGG_V2 = """
def agg(acc, r):
    if acc is None:
        acc = [0, 0]
    return [acc[0] + 1, acc[1] + r["seq"] % 10]
"""


def _app(tmp_path: Path, name: str, agg: str, p: int, ts_p: int = 1) -> str:
    body = APP.format(
        out=str(tmp_path / "out.jsonl"),
        late=str(tmp_path / "late.jsonl"),
        agg=agg,
        n=N,
        rate=RATE,
        keys=KEYS,
        size=SIZE,
        p=p,
        ts_p=ts_p,
    )
    return write_app(tmp_path, name, body)


def test_windows_equal_the_reference_through_a_code_change_and_rescales(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    expected = _reference()
    cluster.client.submit(_app(tmp_path, "v1.py", AGG_V1, 1))
    poll_for(lambda: count_lines(out) > 40, 20, what="windows firing before the upgrade")
    r = cluster.client.upgrade(_app(tmp_path, "v2.py", AGG_V2, 1))
    assert r.applied and r.to_version == 2
    at_code_change = count_lines(out)
    poll_for(lambda: count_lines(out) > at_code_change + 40, 20, what="windows after v2")
    r = cluster.client.upgrade(_app(tmp_path, "v3.py", AGG_V2, 2, ts_p=2))
    assert r.applied and r.to_version == 3
    at_rescale = count_lines(out)
    assert at_rescale < len(expected), "the rescale must happen while windows fire"
    poll_for(lambda: count_lines(out) >= len(expected), 60, what="every window's result")
    rows = read_jsonl(out)
    got = Counter((row["key"], row["start"]) for row in rows)
    twice = [w for w, c in got.items() if c > 1]
    assert not twice, f"windows emitted more than once: {twice[:5]}"
    assert set(got) == set(expected), (set(expected) - set(got), set(got) - set(expected))
    wrong = [
        (row["key"], row["start"], row["value"], expected[(row["key"], row["start"])])
        for row in rows
        if row["value"] != expected[(row["key"], row["start"])]
    ]
    assert not wrong, f"window results differ from the reference: {wrong[:5]}"
    assert all(row["end"] == row["start"] + SIZE and not row["update"] for row in rows)
    versions = [row["version"] for row in rows]
    assert versions[0] == 1 and versions[-1] == 3, (versions[0], versions[-1])
    assert versions == sorted(versions), "a result of older code came after newer code's"
    assert read_jsonl(tmp_path / "late.jsonl") == [], "no record was late"


LATE_APP = """
import asyncio
import json
import time

from hotwire import Topology
from hotwire.sdk.windows import Tumbling
from hotwire.testing import file_sink

OUT = file_sink({out!r})
LATE = file_sink({late!r})


async def events(ctx):
    if ctx.position:
        return
    for t in range(1000):
        yield {{"k": "a", "t": t}}
        if t % 100 == 99:
            await asyncio.sleep(0.01)
    # Until window [980, 990) has fired (the watermark passed 990), at most 30 s.
    deadline = time.monotonic() + 30
    while not fired(980) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    yield {{"k": "a", "t": 985}}  # its window [980, 990) fired but is within the lateness
    yield {{"k": "a", "t": 5}}  # its window [0, 10) closed long ago


def fired(start):
    try:
        with open({out!r}, encoding="utf-8") as f:
            return any(json.loads(line)["start"] == start for line in f if line.strip())
    except (OSError, ValueError):
        return False


app = Topology("late")
ts = app.source("src", events).assign_timestamps("ts", lambda r: r["t"])
w = ts.key_by(lambda r: r["k"]).window(
    "win", Tumbling(10), aggregate=lambda acc, r: (acc or 0) + 1, allowed_lateness=20
)
w.sink("out", OUT)
w.late().sink("late", LATE)
"""


def test_late_records_update_a_window_or_go_to_the_side_output(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out, late = tmp_path / "out.jsonl", tmp_path / "late.jsonl"
    body = LATE_APP.format(out=str(out), late=str(late))
    cluster.client.submit(write_app(tmp_path, "late.py", body))
    poll_for(lambda: count_lines(late) >= 1, 30, what="the late record at the side output")
    poll_for(lambda: count_lines(out) >= 101, 30, what="every window and the update")
    rows = read_jsonl(out)
    first = [r for r in rows if not r["update"]]
    assert sorted(r["start"] for r in first) == list(range(0, 1000, 10))
    assert all(r["value"] == 10 for r in first)
    updates = [r for r in rows if r["update"]]
    assert [(u["start"], u["value"]) for u in updates] == [(980, 11)]
    assert read_jsonl(late) == [{"k": "a", "t": 5}]


def test_a_record_too_late_with_no_late_sink_is_counted_in_status(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Dropped, not silently: status and its JSON count it per PE and instance."""
    out = tmp_path / "out.jsonl"
    body = LATE_APP.format(out=str(out), late=str(tmp_path / "late.jsonl"))
    body = body.replace('w.late().sink("late", LATE)\n', "")
    assert ".late()" not in body
    cluster.client.submit(write_app(tmp_path, "dropped.py", body))
    poll_for(lambda: count_lines(out) >= 101, 30, what="every window and the update")

    def dropped() -> int:
        pes = {p.name: p for p in cluster.client.status("late").apps[0].pes}
        return sum(i.late_dropped for i in pes["win"].instances)

    poll_for(lambda: dropped() == 1, 15, what="the late record counted as dropped")
    res = cluster.streamctl("status", "late", "--json")
    assert res.returncode == 0, res.stderr
    win = next(p for p in json.loads(res.stdout)["pes"] if p["name"] == "win")
    assert win["late_dropped"] == 1
    assert [i["late_dropped"] for i in win["instances"]] == [1]
    human = cluster.streamctl("status", "late").stdout
    assert "1 late dropped" in next(line for line in human.splitlines() if "win" in line)


JOIN_APP = """
from hotwire import Topology
from hotwire.sdk.windows import Tumbling
from hotwire.testing import counter, file_sink

OUT = file_sink({out!r})
WOUT = file_sink({wout!r})


def imp_time(r):
    return r["seq"] * 2


def click_time(r):
    return r["seq"] * 3 + 1


app = Topology("join")
imps = app.source("imps", counter(n={n}, rate={rate}, keys=5)).assign_timestamps(
    "imp_ts", imp_time, out_of_orderness=0
)
clicks = app.source("clicks", counter(n={n}, rate={rate}, keys=5)).assign_timestamps(
    "click_ts", click_time, out_of_orderness=0
)
ik = imps.key_by(lambda r: r["key"])
ck = clicks.key_by(lambda r: r["key"])
ik.interval_join(
    "near", ck, 0, 10, lambda a, b: {{"imp": a["seq"], "click": b["seq"]}}, parallelism={p}
).sink("out", OUT)
ik.window_join(
    "same_window", ck, Tumbling(50), lambda a, b: {{"imp": a["seq"], "click": b["seq"]}}
).sink("wout", WOUT)
"""


def _join_reference(n: int) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    near, same = set(), set()
    for i in range(n):
        for c in range(n):
            if i % 5 != c % 5:
                continue
            ti, tc = i * 2, c * 3 + 1
            if ti <= tc <= ti + 10:
                near.add((i, c))
            if ti // 50 == tc // 50:
                same.add((i, c))
    return near, same


def test_interval_and_window_joins_equal_the_reference_through_a_rescale(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    n = 1500
    out, wout = tmp_path / "out.jsonl", tmp_path / "wout.jsonl"
    near, same = _join_reference(n)

    def app(name: str, p: int) -> str:
        body = JOIN_APP.format(out=str(out), wout=str(wout), n=n, rate=500.0, p=p)
        return write_app(tmp_path, name, body)

    cluster.client.submit(app("v1.py", 1))
    poll_for(lambda: count_lines(out) > len(near) // 5, 20, what="joined pairs before the rescale")
    r = cluster.client.upgrade(app("v2.py", 2))
    assert r.applied
    assert count_lines(out) < len(near), "the rescale must happen while records flow"
    poll_for(lambda: count_lines(out) >= len(near), 60, what="every interval-joined pair")
    poll_for(lambda: count_lines(wout) >= len(same), 60, what="every window-joined pair")
    got = [(row["imp"], row["click"]) for row in read_jsonl(out)]
    assert len(got) == len(set(got)), "a pair was joined twice"
    assert set(got) == near
    wgot = [(row["imp"], row["click"]) for row in read_jsonl(wout)]
    assert len(wgot) == len(set(wgot)) and set(wgot) == same


TIMER_APP = """
import time

from hotwire import Topology
from hotwire.sdk import ProcessPE
from hotwire.testing import counter, file_sink

OUT = file_sink({out!r})


class Timed(ProcessPE):
    def setup(self, ctx):
        self.ctx = ctx
        self.n = {{}}

    def process(self, r):
        k = self.ctx.key
        seen = self.n.get(k, 0)
        self.n[k] = seen + 1
        self.ctx.timers.event(r["seq"] // 100 * 100 + 99)  # the end of its block
        if not seen:
            self.ctx.timers.processing(time.time() + 0.3)
        return ()

    def on_timer(self, t, kind):
        yield {{"key": self.ctx.key, "t": t, "kind": kind, "n": self.n[self.ctx.key]}}

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n.update(state)


app = Topology("timers")
src = app.source("src", counter(n={n}, rate={rate}, keys=10))
ts = src.assign_timestamps("ts", lambda r: r["seq"])
ts.key_by(lambda r: r["key"]).process("timed", Timed, parallelism={p}).sink("out", OUT)
"""


def test_timers_fire_once_each_through_a_rescale(cluster: LocalCluster, tmp_path: Path) -> None:
    n = 2000
    out = tmp_path / "out.jsonl"

    def app(name: str, p: int) -> str:
        return write_app(tmp_path, name, TIMER_APP.format(out=str(out), n=n, rate=800.0, p=p))

    cluster.client.submit(app("v1.py", 1))
    poll_for(lambda: count_lines(out) > 40, 20, what="timers firing before the rescale")
    assert cluster.client.upgrade(app("v2.py", 2)).applied
    assert count_lines(out) < 210, "the rescale must happen while timers fire"
    poll_for(lambda: count_lines(out) >= 210, 30, what="every timer")
    rows = read_jsonl(out)
    events = Counter((r["key"], r["t"]) for r in rows if r["kind"] == "event")
    assert set(events) == {(f"k{k}", b * 100 + 99) for k in range(10) for b in range(n // 100)}
    assert set(events.values()) == {1}, "an event-time timer fired twice"
    # An event timer fires once the watermark passed the block: all 10 of its records counted.
    assert all(r["n"] >= (r["t"] + 1) // 10 for r in rows if r["kind"] == "event")
    processing = Counter(r["key"] for r in rows if r["kind"] == "processing")
    assert processing == {f"k{k}": 1 for k in range(10)}
    assert len(rows) == 210


IDLE_APP = """
import asyncio

from hotwire import Topology
from hotwire.sdk.windows import Tumbling
from hotwire.testing import counter, file_sink

OUT = file_sink({out!r})


async def quiet(ctx):
    for seq in range(3):
        yield {{"seq": seq, "key": "q"}}
    while True:  # then silent, without ending: only the idle timeout frees the watermark
        await asyncio.sleep(3600)


def event_time(r):
    return r["seq"]


app = Topology("idle")
busy = app.source("busy", counter(rate=500.0, keys=3)).assign_timestamps(
    "busy_ts", event_time, idle_timeout=0.5
)
still = app.source("quiet", quiet).assign_timestamps("quiet_ts", event_time, idle_timeout=0.5)
merged = busy.union("both", still)
merged.key_by(lambda r: r["key"]).window(
    "win", Tumbling(100), aggregate=lambda acc, r: (acc or 0) + 1
).sink("out", OUT)
"""


def test_an_idle_source_does_not_hold_the_watermark_back(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    cluster.client.submit(write_app(tmp_path, "idle.py", IDLE_APP.format(out=str(out))))
    poll_for(lambda: count_lines(out) >= 9, 30, what="windows fired past the idle source")
    rows = read_jsonl(out)
    assert {"key": "q", "start": 0, "value": 3} in [
        {k: r[k] for k in ("key", "start", "value")} for r in rows
    ], "the quiet source's own window fired"
    busy = sorted((r["start"], r["value"]) for r in rows if r["key"] == "k0")
    assert busy[0] == (0, 34) and all(v in (33, 34) for _s, v in busy)


def test_a_killed_worker_recovers_open_windows_from_the_checkpoint(tmp_path: Path) -> None:
    """Window contents and the watermark come back from the last checkpoint and the
    source replays from its position: every window fires with the reference value
    (a window that fired after the checkpoint fires again: the sink is not
    transactional, so at least once)."""
    out = tmp_path / "out.jsonl"
    expected = _reference()
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=2.0) as c:
        c.client.submit(_app(tmp_path, "v1.py", AGG_V1, 2))
        poll_for(
            lambda: c.client.status("win").apps[0].last_checkpoint >= 1, 15, what="a checkpoint"
        )
        poll_for(lambda: count_lines(out) > 40, 20, what="windows firing")
        st = c.client.status("win").apps[0]
        src_worker = next(i.worker for p in st.pes if p.name == "src" for i in p.instances)
        victim = "w1" if src_worker != "w1" else "w2"
        assert count_lines(out) < len(expected)
        c.kill_worker(victim)
        poll_for(lambda: c.client.status("win").apps[0].recoveries >= 1, 20, what="a recovery")
        poll_for(
            lambda: {(r["key"], r["start"]) for r in read_jsonl(out)} >= set(expected),
            60,
            what="every window after the recovery",
        )
    rows = read_jsonl(out)
    wrong = [r for r in rows if r["value"] != expected[(r["key"], r["start"])]]
    assert not wrong, f"a window fired with another value than the reference: {wrong[:3]}"


SESSION_APP = """
from hotwire import Topology
from hotwire.sdk.windows import Session
from hotwire.testing import counter, file_sink

OUT = file_sink({out!r})


def event_time(r):
    j = r["seq"] // 10
    return j + 20 * (j // 5)  # bursts of 5 per key, 20 apart


def summary(key, window, records):
    yield {{"key": key, "start": window[0], "end": window[1], "n": len(records),
            "seqs": sorted(r["seq"] for r in records)}}


app = Topology("sessions")
ts = app.source("src", counter(n={n}, rate={rate}, keys=10)).assign_timestamps("ts", event_time)
ts.key_by(lambda r: r["key"]).window(
    "visits", Session(10), process=summary, parallelism={p}
).sink("out", OUT)
"""


def test_session_windows_with_a_process_function_through_a_rescale(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    n = 2000
    out = tmp_path / "out.jsonl"
    expected: dict[tuple[str, int], list[int]] = {}
    for seq in range(n):
        j = seq // 10
        t = j + 20 * (j // 5)
        start = (j // 5) * 25  # the first event time of its burst
        assert start <= t < start + 5
        expected.setdefault((f"k{seq % 10}", start), []).append(seq)

    def app(name: str, p: int) -> str:
        return write_app(tmp_path, name, SESSION_APP.format(out=str(out), n=n, rate=800.0, p=p))

    cluster.client.submit(app("v1.py", 1))
    poll_for(lambda: count_lines(out) > 40, 20, what="sessions closing before the rescale")
    assert cluster.client.upgrade(app("v2.py", 3)).applied
    assert count_lines(out) < len(expected), "the rescale must happen while sessions close"
    poll_for(lambda: count_lines(out) >= len(expected), 30, what="every session")
    rows = read_jsonl(out)
    got = Counter((r["key"], r["start"]) for r in rows)
    assert set(got.values()) == {1} and set(got) == set(expected)
    for r in rows:
        assert r["seqs"] == expected[(r["key"], r["start"])] and r["end"] == r["start"] + 14
