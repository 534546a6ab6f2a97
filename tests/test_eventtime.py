"""Event time, as pure logic: watermarks over inputs, keyed windows, their state
split by key, and the checks Topology.model() makes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotwire.codec import packb, unpackb
from hotwire.eventtime import (
    InputWatermarks,
    KeyedWindows,
    WindowSpec,
    is_marker,
    is_marker_batch,
    marker,
    marker_value,
)
from hotwire.master.cut import states_for_restart
from hotwire.pe.state import REPLICATED_KEY
from hotwire.plan import key_partition
from hotwire.sdk import Topology, ValidationError
from hotwire.sdk.windows import Session, Sliding, Tumbling


# -- markers -------------------------------------------------------------------
def test_a_marker_survives_the_wire_and_is_told_apart_from_records() -> None:
    m = marker(12.5, 3.0)
    back = unpackb(packb([m]))
    assert is_marker_batch(back) and marker_value(back[0]) == (12.5, 3.0)
    assert marker_value(marker(math.inf, None)) == (math.inf, None)
    assert not is_marker_batch([m, m]) and not is_marker({"t": 1}) and not is_marker(None)


# -- watermarks over inputs ------------------------------------------------------
def test_the_watermark_is_the_minimum_over_inputs_and_never_goes_down() -> None:
    w = InputWatermarks()
    w.observe("a", 10, None, now=0)
    assert w.advance({"a", "b"}, now=0) is None  # b not heard from: it holds
    w.observe("b", 7, None, now=0)
    assert w.advance({"a", "b"}, now=0) == 7
    w.observe("b", 5, None, now=0)  # a lower marker changes nothing
    assert w.advance({"a", "b"}, now=0) is None and w.out == 7
    w.observe("b", 20, None, now=0)
    assert w.advance({"a", "b"}, now=0) == 10
    assert w.advance({"b"}, now=0) == 20  # a ended: it holds nothing back


def test_an_idle_input_stops_holding_the_watermark_back() -> None:
    w = InputWatermarks()
    w.observe("a", 100, 2.0, now=0)
    w.observe("b", 10, 2.0, now=0)
    assert w.advance({"a", "b"}, now=1) == 10
    w.observe("a", 200, 2.0, now=3)
    assert w.advance({"a", "b"}, now=3) == 200  # b silent for 3 s > 2 s
    w.saw("b", now=4)  # b speaks again: it holds (its records are late now)
    w.observe("a", 300, 2.0, now=4)
    assert w.advance({"a", "b"}, now=4) is None and w.out == 200
    w.observe("b", 250, 2.0, now=5)
    assert w.advance({"a", "b"}, now=5) == 250


def test_every_input_idle_holds_the_watermark() -> None:
    w = InputWatermarks()
    w.observe("a", 50, 1.0, now=0)
    assert w.advance({"a"}, now=0) == 50
    assert w.advance({"a"}, now=10) is None and w.out == 50


# -- window assignment -----------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    size_slide=st.sampled_from([(10, 7), (10, 4), (10, 5), (10, 10), (6, 4), (2.5, 1), (1, 0.3)]),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 30)),
            st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 30)),
            st.tuples(st.just("wm"), st.integers(0, 30)),
        ),
        max_size=60,
    ),
)
def test_keyed_windows_put_each_record_in_every_open_window_holding_it(
    size_slide: tuple[float, float], steps: list[tuple]
) -> None:
    # Slides that do and do not divide the size, records in and out of order.
    size, slide = size_slide
    spec = WindowSpec("sliding", size=size, slide=slide)
    kw = KeyedWindows(spec, aggregate=lambda acc, r: (acc or 0) + 1)
    expected: dict[tuple, int] = {}
    fired: list = []
    wm = -math.inf
    for step in steps:
        if step[0] == "wm":
            wm = max(wm, step[1])
            fired += kw.advance(step[1])
            continue
        _, key, ts = step
        ws = [w for w in spec.assign(ts) if w[1] > wm]
        got = kw.add(key, ts, {"t": ts})
        assert (got is None) == (not ws), (key, ts, wm)
        for w in ws:
            expected[(key, *w)] = expected.get((key, *w), 0) + 1
    fired += kw.advance(math.inf)
    assert {(f.key, f.start, f.end): f.value for f in fired} == expected
    assert len(fired) == len(expected)


def test_sliding_windows_of_a_record() -> None:
    s = WindowSpec("sliding", size=10, slide=5)
    assert sorted(s.assign(12)) == [(5, 15), (10, 20)]
    assert sorted(s.assign(10)) == [(5, 15), (10, 20)]
    assert sorted(WindowSpec("sliding", size=10, slide=10).assign(9)) == [(0, 10)]
    assert WindowSpec("tumbling", size=60).assign(61.5) == [(60, 120)]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (WindowSpec("tumbling", size=0), "size must be > 0"),
        (WindowSpec("tumbling", size=-5), "size must be > 0"),
        (WindowSpec("sliding", size=5, slide=10), "larger than its size"),
        (WindowSpec("session", gap=math.inf), "finite number"),
        (WindowSpec("hopping", size=5), "unknown window kind"),
    ],
)
def test_bad_window_specs(spec: WindowSpec, problem: str) -> None:
    assert any(problem in p for p in spec.problems()), spec.problems()


# -- keyed windows -----------------------------------------------------------------
def _count() -> KeyedWindows:
    return KeyedWindows(WindowSpec("tumbling", size=10), aggregate=lambda a, r: (a or 0) + 1)


def test_tumbling_windows_fire_when_the_watermark_passes_their_end() -> None:
    w = _count()
    for t in (1, 2, 9, 10, 15):
        updates = w.add("k", t, t)
        assert updates is not None and list(updates) == []
    w.add(3, 4, "int key")  # a key of another type
    assert w.advance(9.5) == []
    fired = w.advance(10)
    assert sorted(((f.key, f.start, f.value) for f in fired), key=repr) == [("k", 0, 3), (3, 0, 1)]
    assert [(f.start, f.value) for f in w.advance(math.inf)] == [(10, 2)]
    assert w.keys == {}, "state is dropped once the watermark passed it"


def test_a_record_late_for_every_window_is_refused_and_changes_nothing() -> None:
    w = _count()
    w.add("k", 5, 5)
    w.advance(20)
    assert w.add("k", 5, 5) is None
    assert w.keys == {}


def test_allowed_lateness_fires_an_update_then_closes() -> None:
    w = KeyedWindows(WindowSpec("tumbling", size=10), 5, aggregate=lambda a, r: (a or 0) + 1)
    w.add("k", 1, 1)
    assert [f.value for f in w.advance(12)] == [1]
    upd = w.add("k", 2, 2)
    assert upd is not None and [(f.value, f.update) for f in upd] == [(2, True)]
    assert w.advance(15) == [] and w.keys == {}  # end + lateness reached: dropped
    assert w.add("k", 3, 3) is None


def test_sessions_merge_when_a_record_bridges_them() -> None:
    w = KeyedWindows(
        WindowSpec("session", gap=5), aggregate=lambda a, r: (a or 0) + r, merge=lambda a, b: a + b
    )
    w.add("k", 0, 1)
    w.add("k", 10, 2)
    assert sorted(w.keys["k"]) == [(0, 5), (10, 15)]
    w.add("k", 5, 4)  # touches [0, 5) and reaches [10, 15)
    assert list(w.keys["k"]) == [(0, 15)]
    w.add("k", 30, 8)
    fired = w.advance(math.inf)
    assert [(f.start, f.end, f.value) for f in fired] == [(0, 15, 7), (30, 35, 8)]


def test_process_windows_keep_their_records() -> None:
    w = KeyedWindows(WindowSpec("session", gap=3))
    for t, r in ((0, "a"), (2, "b"), (9, "c")):
        w.add("k", t, r)
    assert [(f.start, f.end, f.value) for f in w.advance(math.inf)] == [
        (0, 5, ["a", "b"]),
        (9, 12, ["c"]),
    ]


def test_window_state_splits_by_key_and_every_part_keeps_the_watermark() -> None:
    """A rescale from a checkpoint: each key's windows go to the instance that
    owns the key, the watermark to every instance; fired windows stay fired."""
    w = KeyedWindows(WindowSpec("tumbling", size=10), 10, aggregate=lambda a, r: (a or 0) + 1)
    for k in range(20):
        w.add(k, 5, k)
        w.add(k, 25, k)
    w.advance(12)  # [0, 10) fired, kept for the lateness
    state = w.snapshot()
    cut = {"win@1.0": [[k, v] for k, v in state.items()]}
    parts = states_for_restart(unpackb(packb(cut)), {"win": 3}, {"win": True})
    restored = []
    for i in range(3):
        r = KeyedWindows(WindowSpec("tumbling", size=10), 10, aggregate=lambda a, r: (a or 0) + 1)
        for s in parts[("win", i)]:
            r.restore([(k, v) for k, v in s])
        assert r.watermark == 12
        assert all(key_partition(k, 3) == i for k in r.keys)
        restored.append(r)
    assert sum(len(r.keys) for r in restored) == 20
    fired = [f for r in restored for f in r.advance(math.inf)]
    assert sorted((f.key, f.start) for f in fired) == [(k, 20) for k in range(20)]


# -- the checks of Topology.model() ------------------------------------------------------
def _model_problems(build) -> str:  # type: ignore[no-untyped-def]
    t = Topology("et")
    build(t)
    with pytest.raises(ValidationError) as e:
        t.model()
    return str(e.value)


def test_a_window_without_a_timestamp_assigner_upstream_is_refused_by_name() -> None:
    def build(t: Topology) -> None:
        s = t.source("src", lambda ctx: iter(()))
        s.key_by(lambda r: r).window("per_min", Tumbling(60), aggregate=max).sink("o", print)

    text = _model_problems(build)
    assert "PE 'per_min'" in text and "no timestamp assigner" in text and "'src'" in text


def test_a_window_behind_a_union_needs_an_assigner_on_every_path() -> None:
    def build(t: Topology) -> None:
        a = t.source("a", lambda ctx: iter(())).assign_timestamps("ta", lambda r: r)
        b = t.source("b", lambda ctx: iter(()))
        u = a.union("u", b)
        u.key_by(lambda r: r).window("w", Tumbling(1), aggregate=max).sink("o", print)

    assert "from source 'b' with no timestamp assigner" in _model_problems(build)


@pytest.mark.parametrize(
    ("windows", "kw", "problem"),
    [
        (Tumbling(0), {}, "size must be > 0"),
        (Tumbling(-1), {}, "size must be > 0"),
        (Sliding(10, 0), {}, "slide must be > 0"),
        (Sliding(10, 20), {}, "larger than its size"),
        (Session(5), {}, "need merge="),
        (Tumbling(5), {"allowed_lateness": -1}, "allowed_lateness must be a number >= 0"),
        (Tumbling(5), {"process": print}, "exactly one of aggregate"),
        ("60s", {}, "Tumbling(size), Sliding(size, slide) or Session(gap)"),
    ],
)
def test_bad_windows_are_refused_at_model(windows, kw, problem) -> None:  # type: ignore[no-untyped-def]
    def build(t: Topology) -> None:
        s = t.source("src", lambda ctx: iter(())).assign_timestamps("ts", lambda r: r)
        args = {"aggregate": lambda a, r: r, **kw}
        s.key_by(lambda r: r).window("w", windows, **args).sink("o", print)

    text = _model_problems(build)
    assert "PE 'w'" in text and problem in text, text


def test_bad_assigner_options_and_an_unkeyed_window_are_refused() -> None:
    async def ts(r):  # type: ignore[no-untyped-def]
        return r

    def build(t: Topology) -> None:
        s = t.source("src", lambda ctx: iter(()))
        a = s.assign_timestamps("ts", ts, out_of_orderness=-1, idle_timeout=0)
        a.window("w", Tumbling(1), aggregate=max).sink("o", print)

    text = _model_problems(build)
    for problem in (
        "must be sync",
        "out_of_orderness must be a number >= 0",
        "idle_timeout must be a number > 0",
        "PE 'w' of app 'et': a window needs a keyed input",
    ):
        assert problem in text, (problem, text)


def test_a_window_reading_another_window_needs_its_own_timestamp() -> None:
    def build(t: Topology) -> None:
        s = t.source("src", lambda ctx: iter(())).assign_timestamps("ts", lambda r: r)
        w1 = s.key_by(lambda r: r).window("w1", Tumbling(1), aggregate=max)
        w1.key_by(lambda r: r["start"]).window("w2", Tumbling(5), aggregate=max).sink("o", print)

    assert "PE 'w2'" in _model_problems(build) and "timestamp=fn" in _model_problems(build)


def test_the_late_side_output_and_the_window_are_in_the_model() -> None:
    t = Topology("et")
    s = t.source("src", lambda ctx: iter(())).assign_timestamps("ts", lambda r: r["t"])
    w = s.key_by(lambda r: r["k"]).window("w", Sliding(10, 5), aggregate=max)
    w.sink("out", print)
    w.late().sink("late", print)
    m = t.model()
    assert m.pe("w").config["late_to"] == ["late"] and m.pe("w").keyed
    assert m.pe("w").config["window"] == {
        "kind": "sliding",
        "size": 10,
        "slide": 5,
        "mode": "aggregate",
        "allowed_lateness": 0.0,
    }
    assert REPLICATED_KEY not in m.pe("w").config
    assert t.impl("w").ts_fn is t._node("ts").fn


def test_a_record_without_a_usable_timestamp_is_reported_not_windowed() -> None:
    """None, a string, NaN, inf or a bool as a timestamp: the record goes to the
    PE's error policy (skip, dead letter) with a message; the others are windowed."""
    import asyncio

    from hotwire.pe.eventtime import TimestampExecutor, WindowExecutor
    from hotwire.sdk.pe import Context

    bad = [None, "12", math.nan, math.inf, True]
    records = [{"t": t} for t in [1, *bad, 2]]
    errors: list[tuple[object, str]] = []

    def on_error(record: object, e: BaseException) -> None:
        errors.append((record, str(e)))

    window = {"kind": "tumbling", "size": 10, "mode": "aggregate", "allowed_lateness": 0}
    ctx = Context(app="a", pe="w", config={"window": window})
    ex = WindowExecutor(
        lambda a, r: (a or 0) + 1, ctx, on_error, lambda r: "k", ts_fn=lambda r: r["t"]
    )
    asyncio.run(ex.process(records))
    assert [repr(r["t"]) for r, _e in errors] == [repr(t) for t in bad]  # nan != nan
    assert all("return a finite number" in e for _r, e in errors)
    assert [(f["start"], f["value"]) for f in ex.advance(math.inf)] == [(0, 2)]

    errors.clear()
    ctx = Context(app="a", pe="ts", config={"out_of_orderness": 0})
    ts = TimestampExecutor(lambda r: r["t"], ctx, on_error)
    passed = asyncio.run(ts.process(records))
    assert [r["t"] for r in passed] == [1, 2] and len(errors) == len(bad)
    assert ts.watermark() == 2


def test_timers_split_by_key_and_the_watermark_is_copied() -> None:
    from hotwire.pe.state import split_replicated

    timers = [["event", f"k{i}", 100 + i] for i in range(30)] + [["processing", ["t", 1], 5.0]]
    own = split_replicated({"watermark": 7, "timers": timers}, 3, lambda k: key_partition(k, 3))
    assert [o["watermark"] for o in own] == [7, 7, 7]
    assert sorted(t[2] for o in own for t in o["timers"]) == sorted(t[2] for t in timers)
    for i, o in enumerate(own):
        assert all(
            key_partition(tuple(t[1]) if isinstance(t[1], list) else t[1], 3) == i
            for t in o["timers"]
        )
    cut = {"p@1.0": [["k1", 1], [REPLICATED_KEY, {"timers": timers}]]}
    parts = states_for_restart(unpackb(packb(cut)), {"p": 2}, {"p": True})
    got = [
        t
        for i in range(2)
        for s in parts.get(("p", i), [])
        for k, v in s
        if k == REPLICATED_KEY
        for t in v["timers"]
    ]
    assert len(got) == len(timers)
