"""The Topology builder, its validation, ProcessPE/Context and the testing sources."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from hotwire import Topology
from hotwire.model import LogicalModel, check_structure
from hotwire.sdk import Context, KeyedStream, PEImpl, ProcessPE, Stream, ValidationError
from hotwire.testing import counter, file_sink, read_jsonl


def read_orders(ctx: Any) -> Any:
    yield {"amount": 1, "items": []}


def normalise(r: Any) -> Any:
    return r


def add(acc: Any, r: Any) -> Any:
    return (acc or 0) + r["qty"]


def write_line(r: Any) -> None:
    pass


class Enrich(ProcessPE):
    def process(self, record: Any) -> list[Any]:
        return [record]


def orders_app() -> Topology:
    app = Topology("orders")
    raw = app.source("raw", read_orders, parallelism=1, config={"path": "/tmp/x"})
    clean = raw.map("clean", normalise, parallelism=2)
    big = clean.filter("big", lambda r: r["amount"] > 100)
    items = big.flat_map("items", lambda r: r["items"])
    totals = items.key_by(lambda r: r["sku"]).reduce("totals", add, parallelism=3)
    totals.sink("out", write_line)
    return app


def problems_of(app: Topology) -> list[str]:
    with pytest.raises(ValidationError) as info:
        app.model()
    return info.value.problems


# ---------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------


def test_orders_model_specs_and_edges() -> None:
    app = orders_app()
    m = app.model()
    assert isinstance(m, LogicalModel)
    assert m.app == "orders" == app.name
    assert [p.name for p in m.pes] == ["raw", "clean", "big", "items", "totals", "out"]
    kinds = {p.name: p.kind for p in m.pes}
    assert kinds == {
        "raw": "source",
        "clean": "map",
        "big": "filter",
        "items": "flat_map",
        "totals": "reduce",
        "out": "sink",
    }
    assert m.pe("clean").parallelism == 2
    assert m.pe("totals").parallelism == 3
    assert m.pe("totals").keyed and not m.pe("clean").keyed
    assert m.pe("raw").config == {"path": "/tmp/x"}
    assert m.pe("clean").config == {}
    assert m.pe("clean").callable_name == "normalise"
    assert all(len(p.fingerprint) == 64 for p in m.pes)
    assert sorted((s.src, s.dst) for s in m.streams) == sorted(
        [
            ("raw", "clean"),
            ("clean", "big"),
            ("big", "items"),
            ("items", "totals"),
            ("totals", "out"),
        ]
    )
    key_stream = m.stream("items", "totals")
    assert key_stream.partition == "key" and len(key_stream.key_fingerprint) == 64
    assert m.stream("raw", "clean").partition == "shuffle"
    assert m.stream("raw", "clean").key_fingerprint == ""
    assert check_structure(m) == []
    assert LogicalModel.from_json(m.to_json()) == m


def test_model_is_deterministic_and_detects_code_changes() -> None:
    assert orders_app().model() == orders_app().model()
    app = orders_app()
    app._nodes[1].fn = lambda r: r  # a different map function
    assert app.model().pe("clean").fingerprint != orders_app().model().pe("clean").fingerprint


def test_partitions_broadcast_forward_and_branch() -> None:
    app = Topology("p")
    src = app.source("src", read_orders, parallelism=2)
    src.broadcast().map("b", normalise, parallelism=3).sink("sb", write_line)
    src.forward().map("f", normalise, parallelism=2).sink("sf", write_line)
    src.shuffle().sink("ss", write_line)
    m = app.model()
    assert m.stream("src", "b").partition == "broadcast"
    assert m.stream("src", "f").partition == "forward"
    assert m.stream("src", "ss").partition == "shuffle"
    assert m.stream("b", "sb").partition == "shuffle"  # partitioning applies to one stream only
    assert sorted(s.dst for s in m.outputs("src")) == ["b", "f", "ss"]


def test_keyed_stream_operators() -> None:
    app = Topology("k")
    src = app.source("src", read_orders)
    keyed = src.key_by(lambda r: r["sku"])
    assert isinstance(keyed, KeyedStream) and isinstance(keyed, Stream)
    keyed.process("enrich", Enrich, parallelism=2, config={"x": 1}).sink("o1", write_line)
    keyed.map("m", normalise).sink("o2", write_line)
    src.process("plain", Enrich).sink("o3", write_line)
    m = app.model()
    assert m.pe("enrich").kind == "process" and m.pe("enrich").keyed
    assert m.pe("enrich").callable_name == "Enrich"
    assert m.pe("enrich").config == {"x": 1}
    assert not m.pe("plain").keyed
    assert not m.pe("m").keyed
    assert m.stream("src", "m").partition == "key"
    assert m.stream("src", "enrich").key_fingerprint == m.stream("src", "m").key_fingerprint
    assert app.impl("enrich") == PEImpl("process", None, Enrich)
    assert app.key_fn("src", "enrich")({"sku": "a"}) == "a"
    with pytest.raises(KeyError):
        app.key_fn("src", "plain")


def test_union_has_several_inputs() -> None:
    app = Topology("u")
    a = app.source("a", read_orders)
    b = app.source("b", read_orders)
    c = app.source("c", read_orders).key_by(lambda r: r)
    a.union("merged", b, c, parallelism=2).sink("out", write_line)
    m = app.model()
    assert m.pe("merged").kind == "union" and m.pe("merged").parallelism == 2
    assert sorted(s.src for s in m.inputs("merged")) == ["a", "b", "c"]
    assert m.stream("c", "merged").partition == "key"
    assert len(m.pe("merged").fingerprint) == 64
    assert app.impl("merged") == PEImpl("union", None, None)


def test_dl_job_spec() -> None:
    def build(request: dict[str, Any]) -> LogicalModel:
        app = Topology("dl")
        src = app.source("src", read_orders)
        src.dl_job("scorer", request=request, parallelism=2).sink("out", write_line)
        return app.model()

    m = build({"framework": "pytorch", "replicas": 1})
    spec = m.pe("scorer")
    assert spec.kind == "dl_job" and spec.parallelism == 2
    assert spec.config == {"request": {"framework": "pytorch", "replicas": 1}}
    assert (
        spec.fingerprint == build({"replicas": 1, "framework": "pytorch"}).pe("scorer").fingerprint
    )
    assert (
        spec.fingerprint != build({"framework": "pytorch", "replicas": 2}).pe("scorer").fingerprint
    )


def test_impl_gives_functions_and_unknown_pe_is_keyerror() -> None:
    app = orders_app()
    assert app.impl("clean") == PEImpl("map", normalise, None)
    assert app.impl("raw").fn is read_orders
    with pytest.raises(KeyError, match="no PE 'nope'"):
        app.impl("nope")


def test_connect_adds_an_edge() -> None:
    app = Topology("c")
    a = app.source("a", read_orders)
    b = app.source("b", read_orders)
    a.map("m", normalise).sink("out", write_line)
    app.connect(b, "m")
    m = app.model()
    assert sorted(s.src for s in m.inputs("m")) == ["a", "b"]


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def assert_named(problem: str, pe: str, app: str) -> None:
    assert f"PE {pe!r}" in problem and f"app {app!r}" in problem, problem


def test_validation_error_type_and_str() -> None:
    err = ValidationError(["one", "two"])
    assert isinstance(err, ValueError)
    assert str(err) == "one; two" and err.problems == ["one", "two"]


def test_duplicate_names() -> None:
    app = Topology("dup")
    src = app.source("x", read_orders)
    src.map("x", normalise).sink("out", write_line)
    (p,) = [p for p in problems_of(app) if "unique" in p]
    assert_named(p, "x", "dup")


def test_stream_to_nowhere() -> None:
    app = Topology("nowhere")
    app.source("src", read_orders).map("m", normalise)
    (p,) = problems_of(app)
    assert_named(p, "m", "nowhere")
    assert "goes nowhere" in p and "add a sink" in p


def test_cycle_via_connect() -> None:
    app = Topology("cyc")
    src = app.source("src", read_orders)
    a = src.map("a", normalise)
    b = a.map("b", normalise)
    b.sink("out", write_line)
    app.connect(b, "a")
    (p,) = problems_of(app)
    assert "cycle" in p and ("'a'" in p or "'b'" in p) and "app 'cyc'" in p


def test_non_callable_fn_and_bad_process_class() -> None:
    app = Topology("calls")
    src = app.source("src", 42)  # type: ignore[arg-type]
    src.map("m", "not a function").process("p", dict).sink("out", None)  # type: ignore[arg-type]
    problems = problems_of(app)
    assert len(problems) == 4
    for pe in ("src", "m", "p", "out"):
        (p,) = [p for p in problems if f"PE {pe!r}" in p]
        assert_named(p, pe, "calls")
    assert any("ProcessPE" in p for p in problems)
    assert any("not callable" in p and "fn(record) -> record" in p for p in problems)


def test_non_callable_key_fn() -> None:
    app = Topology("keys")
    app.source("src", read_orders).key_by("sku").reduce("r", add).sink("out", write_line)  # type: ignore[arg-type]
    (p,) = problems_of(app)
    assert_named(p, "r", "keys")
    assert "key function" in p


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None, True])
def test_bad_parallelism(bad: Any) -> None:
    app = Topology("par")
    app.source("src", read_orders).map("m", normalise, parallelism=bad).sink("out", write_line)
    (p,) = problems_of(app)
    assert_named(p, "m", "par")
    assert "parallelism must be an integer >= 1" in p


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        {1: "int key"},
        {"b": b"bytes"},
        {"f": float("nan")},
        {"o": object()},
        {"nested": {"deep": [1, {2: 3}]}},
        {"big": 2**70},
    ],
)
def test_bad_config(bad: Any) -> None:
    app = Topology("conf")
    app.source("src", read_orders).map("m", normalise, config=bad).sink("out", write_line)
    (p,) = problems_of(app)
    assert_named(p, "m", "conf")
    assert "config" in p


def test_good_config_nested() -> None:
    app = Topology("conf")
    config = {"a": [1, 2.5, "x", None, True], "b": {"c": {"d": []}}, "t": (1, 2)}
    app.source("src", read_orders).map("m", normalise, config=config).sink("out", write_line)
    assert app.model().pe("m").config == config


def test_forward_between_unequal_parallelism() -> None:
    app = Topology("fwd")
    src = app.source("src", read_orders, parallelism=2)
    src.forward().map("m", normalise, parallelism=3).sink("out", write_line)
    (p,) = problems_of(app)
    assert "forward" in p and "'src'" in p and "'m'" in p and "app 'fwd'" in p
    assert "same parallelism" in p


@pytest.mark.parametrize(
    "bad", ["", "a@b", "a>b", "a b", "tab\there", "nl\n", "a/b", "..", ".hidden", "x" * 64]
)
def test_bad_names(bad: str) -> None:
    app = Topology("names")
    app.source("src", read_orders).map(bad, normalise).sink("out", write_line)
    (p,) = problems_of(app)
    assert_named(p, bad, "names")
    assert "the name is not allowed; use 1-63 characters" in p


def test_bad_app_name() -> None:
    app = Topology("my app")
    app.source("src", read_orders).sink("out", write_line)
    (p,) = problems_of(app)
    assert "app 'my app'" in p and "name" in p


def test_reduce_on_non_keyed_stream() -> None:
    app = Topology("red")
    app.source("src", read_orders).reduce("r", add).sink("out", write_line)
    (p,) = problems_of(app)
    assert_named(p, "r", "red")
    assert ".key_by(fn)" in p


def test_empty_topology() -> None:
    (p,) = problems_of(Topology("empty"))
    assert "app 'empty'" in p and "source" in p


def test_connect_to_unknown_pe() -> None:
    app = Topology("conn")
    src = app.source("src", read_orders)
    src.sink("out", write_line)
    app.connect(src, "ghost")
    (p,) = problems_of(app)
    assert_named(p, "ghost", "conn")
    assert "does not exist" in p


def test_streams_of_another_topology() -> None:
    other = Topology("other")
    foreign = other.source("f", read_orders)
    app = Topology("mine")
    app.source("src", read_orders).union("u", foreign).sink("out", write_line)
    problems = problems_of(app)
    assert any("app 'other'" in p and "PE 'u'" in p for p in problems)


def test_all_problems_reported_together() -> None:
    app = Topology("many")
    src = app.source("src", read_orders, parallelism=0)
    src.map("src", 7).reduce("r@1", add, config={"x": object()})  # type: ignore[arg-type]
    src.forward().map("f", normalise, parallelism=2).sink("out", write_line)
    with pytest.raises(ValidationError) as info:
        app.model()
    problems = info.value.problems
    text = str(info.value)
    assert text == "; ".join(problems)
    expected = [
        "unique",  # duplicate name src
        "parallelism must be an integer",  # src parallelism 0
        "not callable",  # map fn 7
        "the name is not allowed",  # r@1
        "config",  # object in config
        "key_by",  # reduce without key_by
        "goes nowhere",  # r@1 has no downstream
        "forward",  # src (0) -> f (2)
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert all("app 'many'" in p for p in problems)
    assert len(problems) == len(set(problems))


def test_model_only_on_explicit_call() -> None:
    app = Topology("lazy")
    app.source("src", 1)  # type: ignore[arg-type]  # nothing is checked yet
    with pytest.raises(ValidationError, match=re.escape("PE 'src' of app 'lazy'")):
        app.model()


# ---------------------------------------------------------------------------
# ProcessPE and Context
# ---------------------------------------------------------------------------


def test_process_pe_defaults_and_batched() -> None:
    with pytest.raises(TypeError):
        ProcessPE()  # type: ignore[abstract]

    class Batch(ProcessPE):
        def process(self, record: Any) -> list[Any]:
            return [record]

        def process_batch(self, records: list[Any]) -> list[Any]:
            return records

    pe = Enrich()
    ctx = Context("a", "p")
    pe.setup(ctx)
    assert pe.snapshot() is None
    pe.restore({"k": 1})
    pe.teardown()
    assert not Enrich.batched() and Batch.batched()
    assert not hasattr(pe, "process_batch")  # the runtime looks for it on the subclass


def test_context() -> None:
    ctx = Context(app="orders", pe="clean", instance=1, parallelism=2, config={"a": 1})
    assert ctx.logger is logging.getLogger("hotwire.app.orders.clean")
    assert ctx.position == 0 and ctx.key is None and ctx.config == {"a": 1}
    ctx.key = "k1"
    ctx.position = 5
    with pytest.raises(AttributeError):
        ctx.other = 1  # type: ignore[attr-defined]
    assert Context("a", "b").config == {}


# ---------------------------------------------------------------------------
# hotwire.testing sources and sinks
# ---------------------------------------------------------------------------


async def collect(source: Any, ctx: Context, limit: int = 10**9) -> list[Any]:
    out = []
    async for r in source(ctx):
        out.append(r)
        if len(out) >= limit:
            break
    return out


async def test_counter_records_and_position() -> None:
    src = counter(n=5, keys=2)
    recs = await collect(src, Context("a", "s", instance=1))
    assert recs == [{"seq": i, "key": f"k{i % 2}", "src": 1} for i in range(5)]
    ctx = Context("a", "s", position=3)
    assert [r["seq"] for r in await collect(src, ctx)] == [3, 4]
    assert len(await collect(counter(n=1, payload=10), ctx)) == 0
    assert (await collect(counter(n=1, payload=10), Context("a", "s")))[0]["pad"] == "x" * 10


async def test_counter_unbounded_yields_control() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        recs = await collect(counter(), Context("a", "s"), limit=2000)
    finally:
        task.cancel()
    assert len(recs) == 2000 and ticks >= 5


async def test_counter_rate() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    recs = await collect(counter(n=50, rate=500), Context("a", "s"))
    elapsed = loop.time() - t0
    assert len(recs) == 50
    assert 0.07 < elapsed < 2.0


async def test_counter_crash_at_once() -> None:
    src = counter(n=10, crash_at=4)
    got: list[Any] = []
    with pytest.raises(RuntimeError, match="crashed at seq 4"):
        async for r in src(Context("a", "s")):
            got.append(r["seq"])
    assert got == [0, 1, 2, 3]
    again = await collect(src, Context("a", "s", position=4))
    assert [r["seq"] for r in again] == [4, 5, 6, 7, 8, 9]


async def test_counter_pause_at(tmp_path: Any) -> None:
    flag = tmp_path / "pause"
    src = counter(n=6, pause_at=3, pause_file=flag)
    got: list[int] = []

    async def run() -> None:
        async for r in src(Context("a", "s")):
            got.append(r["seq"])

    task = asyncio.create_task(run())
    for _ in range(500):
        if flag.exists():
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    assert flag.exists() and got == [0, 1, 2]
    flag.unlink()
    await asyncio.wait_for(task, 5)
    assert got == list(range(6))


def test_file_sink_and_read_jsonl(tmp_path: Any) -> None:
    path = tmp_path / "out.jsonl"
    assert read_jsonl(path) == []
    sink = file_sink(path)
    sink({"a": 1})
    sink(("k", 2))
    file_sink(str(path))(b"raw")
    assert read_jsonl(path) == [{"a": 1}, ["k", 2], "raw"]
    with open(path, "a") as f:
        f.write('{"torn": ')
    assert read_jsonl(path) == [{"a": 1}, ["k", 2], "raw"]
