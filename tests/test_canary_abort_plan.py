"""A canary's keys adopted while instances run, without a cluster: the abort's plan
(the old-code instances adopt them, nothing starts), the promote's (the new
instances adopt them after restoring the old code's state), the wire form, and
the instance machine holding only the canary's keys until their state is merged."""

from __future__ import annotations

from typing import Any

import pytest

from hotwire.master import canary as cn
from hotwire.master.diff import diff
from hotwire.master.planner import canary_abort_placement, plan_canary_abort, plan_upgrade
from hotwire.master.scheduler import schedule
from hotwire.model import LogicalModel, PESpec, StreamSpec
from hotwire.plan import (
    Adopt,
    CanarySplit,
    Retire,
    StartInstance,
    Switch,
    from_wire,
    key_partition,
    to_wire,
)
from hotwire.plan_wire import from_pb, to_pb
from hotwire.worker import machine as sm
from hotwire.worker.machine import InstanceMachine

APP = "a"
WORKERS = {"w1": 10, "w2": 10}


def pe(name: str, kind: str = "map", par: int = 1, fp: str = "f", **kw: Any) -> PESpec:
    return PESpec(name, kind, par, fp, f"fn_{name}", **kw)


def app(fp: str = "f") -> LogicalModel:
    return LogicalModel.build(
        APP,
        [
            pe("src", "source", 2),
            pe("count", "process", 2, fp, keyed=True),
            pe("out", "sink"),
        ],
        [StreamSpec("src", "count", "key", "k"), StreamSpec("count", "out")],
    )


def canary_placement() -> tuple[LogicalModel, dict[str, Any]]:
    old = app()
    pl = schedule(old, {}, diff(LogicalModel.build(APP, [], []), old), WORKERS, 1, "h1")
    return old, cn.placement(pl, "count", app("g"), 1000, "h2", 2, WORKERS)


def test_abort_in_place_keeps_the_old_instances_and_retires_only_the_canary() -> None:
    model, pl = canary_placement()
    plan = plan_canary_abort(APP, 3, model, pl, "count")
    after = canary_abort_placement(pl, "count")
    c = pl["count"]
    assert after["count"].gen == c.gen and after["count"].workers == c.workers[:2]
    assert after["count"].canary is None and after["src"] == pl["src"]
    ins = [i for b in (*plan.prepare.values(), *plan.switch.values()) for i in b]
    assert not [i for i in ins if isinstance(i, StartInstance)], "nothing new starts"
    adopts = sorted((i for i in ins if isinstance(i, Adopt)), key=lambda a: a.instance)
    assert [a.instance for a in adopts] == ["count@2.0", "count@2.1"]
    assert all(a.predecessors == ("count@2.2",) for a in adopts)
    assert all(a.split == CanarySplit(1000, 2) for a in adopts)
    assert all(a in plan.prepare[c.workers[int(a.instance[-1])]] for a in adopts)
    [ret] = [i for i in ins if isinstance(i, Retire)]
    assert ret.instance == "count@2.2" and ret.keyed and ret.rehash and ret.canary is None
    assert [s.instance for s in ret.successors] == ["count@2.0", "count@2.1"]
    sws = sorted((i for i in ins if isinstance(i, Switch)), key=lambda s: s.instance)
    assert [s.instance for s in sws] == ["src@1.0", "src@1.1"]
    for i, sw in enumerate(sws):
        [route] = sw.routes
        assert route.canary is None and [t.instance for t in route.targets] == [
            "count@2.0",
            "count@2.1",
        ]
        assert route.key is not None and route.key.bundle == "h1"
        assert sw.ended == (f"src@1.{i}>count@2.2",)
        assert not sw.after_epoch and not sw.epoch_out, "one switching PE: no epochs"
    # the canary's keys go back to the instance that owns them without it
    split = CanarySplit(1000, 2)
    for k in range(2000):
        if key_partition(f"k{k}", 3, split) == 2:
            assert 0 <= key_partition(f"k{k}", 2) < 2
    with pytest.raises(ValueError, match="runs no canary"):
        plan_canary_abort(APP, 4, model, after, "count")


def test_adopt_survives_the_wire() -> None:
    a = Adopt(APP, 3, "count@2.0", ("count@2.2", "count@2.3"), CanarySplit(1500, 2))
    assert from_pb(to_pb(a)) == a
    assert from_wire(to_wire(a)) == a


# -- the instance machine -----------------------------------------------------
def in_share(r: Any) -> bool:
    return isinstance(r, str) and r.startswith("c")  # "c…": a key of the canary's share


def adopting(channels: tuple[str, ...] = ("a", "b")) -> InstanceMachine:
    m = InstanceMachine(channels)
    assert m.handle(sm.START) == [sm.Released()]
    assert m.handle(sm.Adopt(3, ("pe@2.2",), in_share)) == []
    return m


def run(m: InstanceMachine, acts: list[sm.Action], done: list[Any]) -> list[sm.Action]:
    """Carry out ``acts`` as the worker does; the records processed go to ``done``."""
    rest: list[sm.Action] = []
    while acts:
        report: sm.Event | None = None
        for a in acts:
            if isinstance(a, sm.Process):
                done.extend(a.records)
                report = sm.PROCESSED
            elif isinstance(a, sm.Snapshot):
                report = sm.SNAPSHOTTED
            else:
                rest.append(a)
        acts = m.handle(report) if report is not None else []
    return rest


def test_adopting_instance_holds_only_the_canary_keys_until_the_merge() -> None:
    m = adopting()
    done: list[Any] = []
    # before the senders switch nothing of the share arrives; after, it is held
    assert run(m, m.handle(sm.Batch("a", ["x1", "c1", "x2"], None)), done) == []
    assert run(m, m.handle(sm.Batch("b", ["c2", "y1"], None)), done) == []
    assert run(m, m.handle(sm.Batch("a", ["c3", "x3"], None)), done) == []
    assert done == ["x1", "x2", "y1", "x3"], "keys outside the share go on at once"
    # a barrier waits for the merge, and so does what comes behind it on its channel
    assert run(m, m.handle(sm.Barrier("b", 7)), done) == []
    assert run(m, m.handle(sm.Batch("b", ["y2", "c4"], None)), done) == []
    assert run(m, m.handle(sm.Batch("a", ["x4"], None)), done) == []
    assert done == ["x1", "x2", "y1", "x3", "x4"]
    # the canary hands over its state and the input it held unprocessed
    acts = run(m, m.handle(sm.Handover("pe@2.2", {"c1": 5}, ["c0"])), done)
    assert acts[0] == sm.Merge(3, ({"c1": 5},))
    # its held input first, then the share's records per channel; the barrier on b
    # then aligns (what is behind it waits for the barrier on a)
    assert done[5:] == ["c0", "c1", "c3", "c2"]
    assert m.in_share is None and not m.adopt_blocked and m.aligning == 7
    assert run(m, m.handle(sm.Barrier("a", 7)), done) == [sm.ForwardBarrier(7)]
    assert m.last_checkpoint == 7 and not m.held
    assert done[9:] == ["y2", "c4"]
    assert run(m, m.handle(sm.Batch("a", ["c5"], None)), done) == []
    assert done[-1] == "c5", "after the merge the share is processed at once"


def test_adoption_waits_for_every_canary_instance() -> None:
    m = InstanceMachine(("a",))
    m.handle(sm.START)
    m.handle(sm.Adopt(3, ("pe@2.2", "pe@2.3"), in_share))
    done: list[Any] = []
    run(m, m.handle(sm.Batch("a", ["c1", "x1"], None)), done)
    assert run(m, m.handle(sm.Handover("pe@2.3", {"c9": 1})), done) == []
    assert done == ["x1"]
    acts = run(m, m.handle(sm.Handover("pe@2.2", None)), done)
    assert acts == [sm.Merge(3, ({"c9": 1}, None))]
    assert done == ["x1", "c1"]


def test_an_aborted_adoption_lets_what_it_held_flow() -> None:
    m = adopting(("a",))
    done: list[Any] = []
    run(m, m.handle(sm.Batch("a", ["x1", "c1"], None)), done)
    run(m, m.handle(sm.Barrier("a", 4)), done)
    assert done == ["x1"]
    assert m.handle(sm.Abort(3)) == []
    assert run(m, m.handle(sm.RESUME), done) == [sm.ForwardBarrier(4)]
    assert done == ["x1", "c1"] and m.in_share is None
    # a state that comes after all is not taken
    assert m.handle(sm.Handover("pe@2.2", {"c1": 1})) == [sm.DropState("pe@2.2")]


def test_an_adoption_may_arrive_while_a_batch_is_processed() -> None:
    m = InstanceMachine(("a",))
    m.handle(sm.START)
    assert m.handle(sm.Batch("a", ["c1"], None)) == [sm.Process("a", ["c1"], None)]
    assert m.handle(sm.Adopt(3, ("pe@2.2",), in_share)) == []
    assert m.handle(sm.PROCESSED) == []
    with pytest.raises(RuntimeError, match="in progress"):
        m.handle(sm.Adopt(4, ("pe@2.2",), in_share))


# -- a promote: the new instances adopt the canary's keys -----------------------
def test_promote_plan_lets_the_new_instances_adopt_the_canary_keys() -> None:
    model, pl = canary_placement()
    new = app("g")
    change = diff(model, new)
    promote_pl = schedule(new, pl, change, WORKERS, 3, "h2")
    plain = plan_upgrade(APP, 3, model, pl, new, promote_pl, change, "h2")
    plan = plan_upgrade(APP, 3, model, pl, new, promote_pl, change, "h2", adopt_canary=True)
    ins = [i for b in (*plan.prepare.values(), *plan.switch.values()) for i in b]
    starts = sorted((i for i in ins if isinstance(i, StartInstance)), key=lambda s: s.index)
    assert [s.predecessors for s in starts] == [("count@2.0", "count@2.1")] * 2
    adopts = sorted((i for i in ins if isinstance(i, Adopt)), key=lambda a: a.instance)
    assert [(a.instance, a.predecessors, a.split) for a in adopts] == [
        ("count@3.0", ("count@2.2",), CanarySplit(1000, 2)),
        ("count@3.1", ("count@2.2",), CanarySplit(1000, 2)),
    ]
    for batch in plan.prepare.values():  # an Adopt comes after its instance is built
        names = [getattr(i, "instance", "") for i in batch]
        for a in (i for i in batch if isinstance(i, Adopt)):
            assert names.index(a.instance) < batch.index(a)
    # the switch is the one without adoption: every old instance hands its state over
    assert plan.switch == plain.switch
    plain_starts = [i for b in plain.prepare.values() for i in b if isinstance(i, StartInstance)]
    assert all(len(s.predecessors) == 3 for s in plain_starts)
    # nothing to adopt from a placement without a canary
    rescale = plan_upgrade(APP, 4, new, promote_pl, new, promote_pl, change, "h2", True)
    assert not [i for b in rescale.prepare.values() for i in b if isinstance(i, Adopt)]


def test_a_new_instance_merges_the_canary_after_restoring_the_old_state() -> None:
    m = InstanceMachine(("a",), ("pe@2.0", "pe@2.1"))
    assert m.handle(sm.START) == []
    assert m.handle(sm.Adopt(3, ("pe@2.2",), in_share)) == []
    done: list[Any] = []
    assert run(m, m.handle(sm.Batch("a", ["x1", "c1"], None)), done) == []
    assert run(m, m.handle(sm.Barrier("a", 5)), done) == []
    assert run(m, m.handle(sm.Batch("a", ["c2", "x2"], None)), done) == []
    # the canary's part comes first: it waits for the restore
    assert run(m, m.handle(sm.Handover("pe@2.2", {"c0": 1}, ["c9"])), done) == []
    assert run(m, m.handle(sm.Handover("pe@2.1", None)), done) == []
    acts = run(m, m.handle(sm.Handover("pe@2.0", {"x0": 1})), done)
    assert acts[:3] == [sm.Restore((None, {"x0": 1})), sm.Released(), sm.Merge(3, ({"c0": 1},))]
    assert sm.ForwardBarrier(5) in acts
    # before the barrier: the canary's held input, x1 and c1; after it: c2 and x2
    assert done == ["c9", "x1", "c1", "c2", "x2"]


def test_a_new_instance_holds_the_share_until_the_canary_hands_over() -> None:
    m = InstanceMachine(("a",), ("pe@2.0",))
    m.handle(sm.START)
    m.handle(sm.Adopt(3, ("pe@2.2",), in_share))
    done: list[Any] = []
    run(m, m.handle(sm.Batch("a", ["x1", "c1"], None)), done)
    acts = run(m, m.handle(sm.Handover("pe@2.0", {"x0": 1})), done)
    assert acts == [sm.Restore(({"x0": 1},)), sm.Released()]
    assert done == ["x1"], "the old code's keys run before the canary's part is in"
    # a barrier held with the batch behind it waits for the merge
    run(m, m.handle(sm.Barrier("a", 6)), done)
    run(m, m.handle(sm.Batch("a", ["x2"], None)), done)
    assert done == ["x1"] and "a" in m.adopt_blocked
    acts = run(m, m.handle(sm.Handover("pe@2.2", {"c0": 1})), done)
    assert acts == [sm.Merge(3, ({"c0": 1},)), sm.ForwardBarrier(6)]
    assert done == ["x1", "c1", "x2"]
