"""Canary upgrades without a cluster: the key split, the canary's placement and
plans (start, promote, abort), the wire form, the checks and the verdict."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from hotwire.master import canary as cn
from hotwire.master.diff import ChangeSet, diff
from hotwire.master.planner import plan_upgrade
from hotwire.master.scheduler import schedule
from hotwire.model import LogicalModel, PESpec, StreamSpec
from hotwire.plan import (
    CanarySplit,
    Retire,
    Route,
    StartInstance,
    Switch,
    Target,
    from_wire,
    key_partition,
    to_wire,
)
from hotwire.plan_wire import from_pb, to_pb
from hotwire.worker.channels import RouteState

APP = "a"
WORKERS = {"w1": 10, "w2": 10}


def pe(name: str, kind: str = "map", par: int = 1, fp: str = "f", **kw: Any) -> PESpec:
    return PESpec(name, kind, par, fp, f"fn_{name}", **kw)


def app(fp: str = "f", config: dict[str, Any] | None = None) -> LogicalModel:
    return LogicalModel.build(
        APP,
        [
            pe("src", "source"),
            pe("count", "process", 2, fp, keyed=True, config=config or {}),
            pe("out", "sink"),
        ],
        [StreamSpec("src", "count", "key", "k"), StreamSpec("count", "out")],
    )


def test_canary_keys_split_and_the_others_keep_their_owner() -> None:
    split = CanarySplit(share=1000, first=2)
    owners = [key_partition(f"k{i}", 3, split) for i in range(5000)]
    canary = [i for i, o in enumerate(owners) if o == 2]
    assert 350 < len(canary) < 650  # about 10%
    for i, o in enumerate(owners):
        if o != 2:
            assert o == key_partition(f"k{i}", 2), "a key outside the canary keeps its instance"


def test_start_promote_and_abort_plans() -> None:
    old, new = app(), app("g", {"x": 1})
    old_pl = schedule(old, {}, diff(LogicalModel.build(APP, [], []), old), WORKERS, 1, "h1")
    change = diff(old, new)
    cn.check(APP, "count", old, new, change)
    pl = cn.placement(old_pl, "count", new, 1000, "h2", 2, WORKERS)
    c = pl["count"]
    assert c.parallelism == 3 and c.gen == 2 and c.workers[:2] == old_pl["count"].workers
    assert c.canary is not None and (c.canary.first, c.canary.share) == (2, 1000)
    plan = plan_upgrade(APP, 2, old, old_pl, old, pl, ChangeSet(regenerated=("count",)), "h1")
    ins = [i for b in (*plan.prepare.values(), *plan.switch.values()) for i in b]
    starts = {i.index: i for i in ins if isinstance(i, StartInstance)}
    assert [starts[j].bundle for j in range(3)] == ["h1", "h1", "h2"]
    assert [starts[j].config for j in range(3)] == [{}, {}, {"x": 1}]
    assert starts[2].input_key is not None and starts[2].input_key.bundle == "h2"
    [sw] = [i for i in ins if isinstance(i, Switch)]
    [route] = sw.routes
    assert route.canary == CanarySplit(1000, 2) and len(route.targets) == 3
    retires = [i for i in ins if isinstance(i, Retire)]
    assert len(retires) == 2
    assert all(r.canary == CanarySplit(1000, 2) and not r.rehash for r in retires)

    # promote: the new version from the canary's placement; every key split anew
    promote_pl = schedule(new, pl, change, WORKERS, 3, "h2")
    assert promote_pl["count"].canary is None and promote_pl["count"].parallelism == 2
    plan = plan_upgrade(APP, 3, old, pl, new, promote_pl, change, "h2")
    ins = [i for b in (*plan.prepare.values(), *plan.switch.values()) for i in b]
    retires = [i for i in ins if isinstance(i, Retire)]
    assert len(retires) == 3 and all(r.rehash and r.canary is None for r in retires)
    # the old code's instances hand their state over whole; the canary's is split
    assert sorted((r.instance, r.same_index) for r in retires) == [
        ("count@2.0", True),
        ("count@2.1", True),
        ("count@2.2", False),
    ]
    assert {i.bundle for i in ins if isinstance(i, StartInstance)} == {"h2"}
    [sw] = [i for i in ins if isinstance(i, Switch)]
    assert sw.routes[0].canary is None

    # abort: the running code from the canary's placement
    regen = ChangeSet(regenerated=("count",))
    abort_pl = schedule(old, pl, regen, WORKERS, 3, "h1")
    plan = plan_upgrade(APP, 3, old, pl, old, abort_pl, regen, "h1")
    ins = [i for b in (*plan.prepare.values(), *plan.switch.values()) for i in b]
    assert {i.bundle for i in ins if isinstance(i, StartInstance)} == {"h1"}
    retires = [i for i in ins if isinstance(i, Retire)]
    assert all(r.rehash for r in retires)
    assert [r.same_index for r in sorted(retires, key=lambda r: r.instance)] == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize("first", [1, 2, 3, 5])
def test_an_old_code_instance_of_a_canary_owns_only_keys_of_its_index(first: int) -> None:
    """Retire.same_index: the keys instance i < first owns in a canary's placement
    are the keys instance i owns at ``first`` instances without the canary."""
    split = CanarySplit(share=1000, first=first)
    for k in range(3000):
        owner = key_partition(f"k{k}", first + 1, split)
        if owner < first:
            assert key_partition(f"k{k}", first) == owner


def test_canary_fields_survive_the_wire() -> None:
    split = CanarySplit(2500, 3)
    route = Route("count", "key", (Target("c", "count@2.0", "w1"),), None, split)
    sw = Switch(APP, 2, "src@1.0", (route,), (), ())
    ret = Retire(APP, 2, "count@1.0", (), keyed=True, canary=split, rehash=True)
    stay = Retire(APP, 2, "count@1.0", (), keyed=True, rehash=True, same_index=True)
    for ins in (sw, ret, stay):
        assert from_pb(to_pb(ins)) == ins
        assert from_wire(to_wire(ins)) == ins
    plain = Retire(APP, 2, "count@1.0", ())
    assert from_pb(to_pb(plain)) == plain


def test_canary_checks() -> None:
    old = app()
    assert cn.parse_share("count=10%") == ("count", 1000)
    assert cn.parse_share("count=0.25") == ("count", 2500)
    for bad in ("count", "count=", "count=x%", "count=0%", "count=100%"):
        with pytest.raises(cn.CanaryError):
            cn.parse_share(bad)
    rescaled = LogicalModel.build(
        APP,
        [pe("src", "source", 2), pe("count", "process", 2, "g", keyed=True), pe("out", "sink")],
        old.streams,
    )
    with pytest.raises(cn.CanaryError, match=re.escape("may change PE 'count' only")):
        cn.check(APP, "count", old, rescaled, diff(old, rescaled))
    strict = app("g", {"on_error": "fail"})
    with pytest.raises(cn.CanaryError, match=re.escape("on_error='fail'")):
        cn.check(APP, "count", old, strict, diff(old, strict))
    with pytest.raises(cn.CanaryError, match="no live worker has a free slot"):
        pl = schedule(old, {}, diff(LogicalModel.build(APP, [], []), old), {"w": 4}, 1, "h")
        cn.placement(pl, "count", app("g"), 1000, "h2", 2, {"w": 4})


def test_verdict() -> None:
    run = cn.CanaryRun(APP, "count", 1000, app(), "h2", 1, 0.05, 10.0, started=100.0)
    run.stats = {"canary": {"records_in": 10, "errors": 5}}
    assert cn.verdict(run, 101.0) == "", "too few records to judge"
    run.stats = {"canary": {"records_in": 100, "errors": 6}}
    assert cn.verdict(run, 101.0) == "abort"
    run.stats = {"canary": {"records_in": 100, "errors": 1}}
    assert cn.verdict(run, 101.0) == ""
    assert cn.verdict(run, 110.0) == "promote"
    run.stats = {"canary": {"records_in": 1, "errors": 0, "failed": 1}}
    assert cn.verdict(run, 101.0) == "abort"
    manual = cn.CanaryRun(APP, "count", 1000, app(), "h2", 1)
    manual.stats = {"canary": {"records_in": 1000, "errors": 1000}}
    assert cn.verdict(manual, 1e12) == "", "no limit, no time: only by hand"


class _Sink:
    local = False  # a remote channel, as RouteState sees it

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    async def send(self, records: list[Any], t: float | None = None) -> None:
        self.batches.append(records)  # t: the batch's source stamp (OutChannel.send)


def test_shuffle_into_a_canary_deals_its_share_of_batches() -> None:
    chans = [_Sink() for _ in range(3)]
    targets = tuple(Target(f"c{i}", f"m@2.{i}", "w") for i in range(3))
    rs = RouteState(Route("m", "shuffle", targets, None, CanarySplit(2000, 2)), chans, None)  # type: ignore[arg-type]

    async def go() -> None:
        for b in range(100):
            await rs.emit([b])

    asyncio.run(go())
    assert [len(c.batches) for c in chans] == [40, 40, 20]
