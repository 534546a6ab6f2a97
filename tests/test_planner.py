"""The scheduler and the upgrade planner: exact plans for each kind of change, and
properties over random topologies and mutations (the plan, applied to the old
physical state, yields the new one; its size follows the change, not the app)."""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotwire.master.diff import ChangeSet, diff
from hotwire.master.planner import StateMove, plan_stop, plan_upgrade, state_moves
from hotwire.master.scheduler import SchedulingError, schedule
from hotwire.model import LogicalModel, PESpec, StreamSpec, check_structure
from hotwire.plan import (
    Gate,
    Instruction,
    KeyRef,
    PEPlacement,
    Placement,
    Plan,
    Retire,
    Route,
    StartInstance,
    StopApp,
    Successor,
    Switch,
    Target,
    from_wire,
    parse_instance_id,
    to_wire,
)
from hotwire.plan_wire import WireError, from_pb, to_pb
from hotwire.proto import hotwire_pb2 as pb

APP = "orders"
ONE = {"w1": 100}


def pe(name: str, kind: str = "map", par: int = 1, fp: str = "f", **kw: Any) -> PESpec:
    return PESpec(name, kind, par, fp, f"fn_{name}", **kw)


def model(pes: list[PESpec], streams: list[StreamSpec]) -> LogicalModel:
    m = LogicalModel.build(APP, pes, streams)
    assert check_structure(m) == []
    return m


def empty() -> LogicalModel:
    return LogicalModel.build(APP, [], [])


def submit(m: LogicalModel, workers: dict[str, int] = ONE) -> tuple[Placement, Plan]:
    c = diff(empty(), m)
    pl = schedule(m, {}, c, workers, 1, "b1")
    return pl, plan_upgrade(APP, 1, empty(), {}, m, pl, c)


def upgrade(
    old: LogicalModel,
    new: LogicalModel,
    workers: dict[str, int] = ONE,
) -> tuple[ChangeSet, Placement, Placement, Plan]:
    old_pl, _ = submit(old, workers)
    c = diff(old, new)
    new_pl = schedule(new, old_pl, c, workers, 2, "b2")
    return c, old_pl, new_pl, plan_upgrade(APP, 2, old, old_pl, new, new_pl, c, "b2")


def instructions(plan: Plan) -> set[Instruction]:
    return {i for p in (plan.prepare, plan.switch) for ins in p.values() for i in ins}


def route(
    dst: str,
    targets: list[str],
    partition: str = "shuffle",
    key: KeyRef | None = None,
    src: str = "",
    worker: str = "w1",
) -> Route:
    return Route(dst, partition, tuple(Target(f"{src}>{t}", t, worker) for t in targets), key)


def start(
    pe_: str,
    gen: int,
    index: int,
    par: int,
    inputs: list[str],
    routes: list[Route],
    kind: str = "map",
    preds: tuple[str, ...] = (),
    input_key: KeyRef | None = None,
    bundle: str = "b2",
) -> StartInstance:
    return StartInstance(
        APP,
        2,
        pe_,
        kind,
        gen,
        index,
        par,
        bundle,
        tuple(inputs),
        tuple(routes),
        preds,
        input_key,
        {},
    )


# ---------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------

CHAIN = model(
    [pe("src", "source"), pe("mid", par=2), pe("out", "sink", 2)],
    [StreamSpec("src", "mid"), StreamSpec("mid", "out")],
)


def test_schedule_spreads_instances_ties_by_name() -> None:
    pl = schedule(CHAIN, {}, diff(empty(), CHAIN), {"b": 4, "a": 4, "c": 4}, 1, "h1")
    assert pl == {
        "mid": PEPlacement(1, "h1", ("a", "b")),
        "out": PEPlacement(1, "h1", ("c", "a")),
        "src": PEPlacement(1, "h1", ("b",)),
    }
    counts: dict[str, int] = {}
    for p in pl.values():
        for w in p.workers:
            counts[w] = counts.get(w, 0) + 1
    assert sorted(counts.values()) == [1, 2, 2]


def test_schedule_is_deterministic() -> None:
    workers = {"x": 3, "y": 3}
    c = diff(empty(), CHAIN)
    assert schedule(CHAIN, {}, c, workers, 1, "h") == schedule(CHAIN, {}, c, dict(workers), 1, "h")


def test_schedule_respects_slots_and_says_how_many_are_missing() -> None:
    with pytest.raises(SchedulingError, match=re.escape("needs 5 free slot(s)")) as e:
        schedule(CHAIN, {}, diff(empty(), CHAIN), {"a": 2, "b": 2}, 1, "h")
    assert "have 4" in str(e.value)
    with pytest.raises(SchedulingError, match="have 0"):
        schedule(CHAIN, {}, diff(empty(), CHAIN), {}, 1, "h")
    pl = schedule(CHAIN, {}, diff(empty(), CHAIN), {"a": 1, "b": 4}, 1, "h")
    assert sum(w == "a" for p in pl.values() for w in p.workers) == 1


def test_schedule_keeps_kept_pes_and_places_new_ones() -> None:
    old_pl = schedule(CHAIN, {}, diff(empty(), CHAIN), {"a": 9, "b": 9}, 1, "h1")
    new = model(
        [pe("src", "source"), pe("mid", par=2, fp="g"), pe("out", "sink", 2), pe("log", "sink")],
        [StreamSpec("src", "mid"), StreamSpec("mid", "out"), StreamSpec("mid", "log")],
    )
    c = diff(CHAIN, new)
    new_pl = schedule(new, old_pl, c, {"a": 9, "b": 9, "c": 9}, 2, "h2")
    assert new_pl["src"] == old_pl["src"]
    assert new_pl["out"] == old_pl["out"]
    # regenerated: new gen and bundle, same workers as before (state handover is local)
    assert new_pl["mid"] == PEPlacement(2, "h2", old_pl["mid"].workers)
    assert new_pl["log"] == PEPlacement(2, "h2", ("c",))


def test_regenerated_pe_prefers_old_workers_only_when_alive_and_free() -> None:
    old = model(
        [pe("s", "source"), pe("m", par=3), pe("k", "sink")],
        [StreamSpec("s", "m"), StreamSpec("m", "k")],
    )
    old_pl = {
        "s": PEPlacement(1, "h1", ("a",)),
        "m": PEPlacement(1, "h1", ("a", "dead", "b")),
        "k": PEPlacement(1, "h1", ("b",)),
    }
    new = model(
        [pe("s", "source"), pe("m", par=4), pe("k", "sink")],
        [StreamSpec("s", "m"), StreamSpec("m", "k")],
    )
    pl = schedule(new, old_pl, diff(old, new), {"a": 2, "b": 9, "c": 9}, 2, "h2")
    # m.0 stays on a (a then full), m.2 stays on b, m.1 and m.3 spread over c then ...
    assert pl["m"].workers[0] == "a"
    assert pl["m"].workers[2] == "b"
    assert pl["m"].workers[1] == "c"
    assert pl["m"].workers[3] in {"b", "c"}
    assert pl["s"] == old_pl["s"] and pl["k"] == old_pl["k"]


def test_removed_pes_free_their_slots() -> None:
    old = model([pe("s", "source"), pe("k", "sink")], [StreamSpec("s", "k")])
    old_pl = schedule(old, {}, diff(empty(), old), {"a": 2}, 1, "h1")
    new = model([pe("s", "source"), pe("k2", "sink")], [StreamSpec("s", "k2")])
    pl = schedule(new, old_pl, diff(old, new), {"a": 2}, 2, "h2")
    assert pl == {"s": old_pl["s"], "k2": PEPlacement(2, "h2", ("a",))}


# ---------------------------------------------------------------------------
# Planner: one exact plan per kind of change
# ---------------------------------------------------------------------------

DS = model([pe("D", "source"), pe("S", "sink")], [StreamSpec("D", "S")])


def test_first_submit_only_starts_instances_downstream_first() -> None:
    m = model(
        [pe("D", "source"), pe("T"), pe("S", "sink")], [StreamSpec("D", "T"), StreamSpec("T", "S")]
    )
    _, plan = submit(m)
    assert plan.switch == {}
    assert list(plan.prepare) == ["w1"]
    assert [(i.pe, type(i)) for i in plan.prepare["w1"]] == [
        ("S", StartInstance),
        ("T", StartInstance),
        ("D", StartInstance),
    ]
    d = plan.prepare["w1"][2]
    assert isinstance(d, StartInstance)
    assert (
        d.inputs == ()
        and d.predecessors == ()
        and d.routes == (route("T", ["T@1.0"], src="D@1.0"),)
    )


def test_insert_pe_into_stream() -> None:
    new = model(
        [pe("D", "source"), pe("T"), pe("S", "sink")], [StreamSpec("D", "T"), StreamSpec("T", "S")]
    )
    _, _, _, plan = upgrade(DS, new)
    assert plan.prepare == {
        "w1": (
            start("T", 2, 0, 1, ["D@1.0>T@2.0"], [route("S", ["S@1.0"], src="T@2.0")]),
            Gate(APP, 2, "S@1.0", ("T@2.0>S@1.0",), ("D@1.0>S@1.0",)),
        )
    }
    assert plan.switch == {
        "w1": (
            Switch(
                APP, 2, "D@1.0", (route("T", ["T@2.0"], src="D@1.0"),), ("S",), ("D@1.0>S@1.0",)
            ),
        )
    }


def test_remove_pe_from_the_middle() -> None:
    old = model(
        [pe("D", "source"), pe("T"), pe("S", "sink")], [StreamSpec("D", "T"), StreamSpec("T", "S")]
    )
    _, _, _, plan = upgrade(old, DS)
    assert plan.prepare == {"w1": (Gate(APP, 2, "S@1.0", ("D@1.0>S@1.0",), ("T@1.0>S@1.0",)),)}
    assert plan.switch == {
        "w1": (
            Switch(
                APP, 2, "D@1.0", (route("S", ["S@1.0"], src="D@1.0"),), ("T",), ("D@1.0>T@1.0",)
            ),
            Retire(APP, 2, "T@1.0", (), False),
        )
    }


def test_add_and_remove_a_branch() -> None:
    branched = model(
        [pe("D", "source"), pe("S", "sink"), pe("L", "sink", 2)],
        [StreamSpec("D", "S"), StreamSpec("D", "L", "broadcast")],
    )
    _, _, _, plan = upgrade(DS, branched)
    routes = (route("L", ["L@2.0", "L@2.1"], "broadcast", src="D@1.0"),)
    assert instructions(plan) == {
        start("L", 2, 0, 2, ["D@1.0>L@2.0"], [], kind="sink"),
        start("L", 2, 1, 2, ["D@1.0>L@2.1"], [], kind="sink"),
        Switch(APP, 2, "D@1.0", routes, (), ()),
    }
    _, _, _, plan = upgrade(branched, DS)
    assert instructions(plan) == {
        Switch(APP, 2, "D@1.0", (), ("L",), ("D@1.0>L@1.0", "D@1.0>L@1.1")),
        Retire(APP, 2, "L@1.0", (), False),
        Retire(APP, 2, "L@1.1", (), False),
    }


def test_reroute_a_stream() -> None:
    old = model(
        [pe("D", "source"), pe("A"), pe("B"), pe("S", "sink")],
        [StreamSpec("D", "A"), StreamSpec("D", "B"), StreamSpec("A", "S"), StreamSpec("B", "S")],
    )
    new = model(
        old.pes,
        [StreamSpec("D", "A"), StreamSpec("D", "B"), StreamSpec("A", "B"), StreamSpec("B", "S")],
    )
    c, _, _, plan = upgrade(old, new)
    assert c.regenerated == ()
    assert instructions(plan) == {
        Switch(APP, 2, "A@1.0", (route("B", ["B@1.0"], src="A@1.0"),), ("S",), ("A@1.0>S@1.0",)),
        Gate(APP, 2, "B@1.0", ("A@1.0>B@1.0",), ()),
        Gate(APP, 2, "S@1.0", (), ("A@1.0>S@1.0",)),
    }


@pytest.mark.parametrize("change", [{"fingerprint": "g"}, {"config": {"n": 2}}])
def test_change_code_or_config(change: dict[str, Any]) -> None:
    old = model(
        [pe("D", "source"), pe("M"), pe("S", "sink")], [StreamSpec("D", "M"), StreamSpec("M", "S")]
    )
    new = model(
        [pe("D", "source"), dataclasses.replace(pe("M"), **change), pe("S", "sink")], old.streams
    )
    _, _, _, plan = upgrade(old, new)
    st_ = dataclasses.replace(
        start(
            "M", 2, 0, 1, ["D@1.0>M@2.0"], [route("S", ["S@1.0"], src="M@2.0")], preds=("M@1.0",)
        ),
        config=change.get("config", {}),
    )
    assert plan.prepare == {"w1": (st_, Gate(APP, 2, "S@1.0", ("M@2.0>S@1.0",), ("M@1.0>S@1.0",)))}
    assert plan.switch == {
        "w1": (
            Switch(APP, 2, "D@1.0", (route("M", ["M@2.0"], src="D@1.0"),), (), ("D@1.0>M@1.0",)),
            Retire(APP, 2, "M@1.0", (Successor("M@2.0", "w1"),), False),
        )
    }
    assert plan.prepare["w1"][0].config == change.get("config", {})  # type: ignore[union-attr]


def test_change_source_code() -> None:
    new = model([pe("D", "source", fp="g"), pe("S", "sink")], [StreamSpec("D", "S")])
    _, _, _, plan = upgrade(DS, new)
    assert instructions(plan) == {
        start(
            "D", 2, 0, 1, [], [route("S", ["S@1.0"], src="D@2.0")], kind="source", preds=("D@1.0",)
        ),
        Gate(APP, 2, "S@1.0", ("D@2.0>S@1.0",), ("D@1.0>S@1.0",)),
        Retire(APP, 2, "D@1.0", (Successor("D@2.0", "w1"),), False),
    }


def test_rescale_stateless() -> None:
    old = model(
        [pe("D", "source"), pe("M"), pe("S", "sink")], [StreamSpec("D", "M"), StreamSpec("M", "S")]
    )
    new = model([pe("D", "source"), pe("M", par=2), pe("S", "sink")], old.streams)
    _, _, _, plan = upgrade(old, new)
    preds = ("M@1.0",)
    assert instructions(plan) == {
        start("M", 2, 0, 2, ["D@1.0>M@2.0"], [route("S", ["S@1.0"], src="M@2.0")], preds=preds),
        start("M", 2, 1, 2, ["D@1.0>M@2.1"], [route("S", ["S@1.0"], src="M@2.1")], preds=preds),
        Gate(APP, 2, "S@1.0", ("M@2.0>S@1.0", "M@2.1>S@1.0"), ("M@1.0>S@1.0",)),
        Switch(
            APP, 2, "D@1.0", (route("M", ["M@2.0", "M@2.1"], src="D@1.0"),), (), ("D@1.0>M@1.0",)
        ),
        Retire(APP, 2, "M@1.0", (Successor("M@2.0", "w1"), Successor("M@2.1", "w1")), False),
    }


def test_rescale_keyed() -> None:
    old = model(
        [pe("D", "source"), pe("R", "reduce", 2, keyed=True), pe("S", "sink")],
        [StreamSpec("D", "R", "key", "k"), StreamSpec("R", "S")],
    )
    new = model([pe("D", "source"), pe("R", "reduce", 3, keyed=True), pe("S", "sink")], old.streams)
    _, _, _, plan = upgrade(old, new)
    preds = ("R@1.0", "R@1.1")
    succ = tuple(Successor(f"R@2.{j}", "w1") for j in range(3))
    ik = KeyRef("b2", "D", "R")
    got = instructions(plan)
    assert got == {
        *(
            start(
                "R",
                2,
                j,
                3,
                [f"D@1.0>R@2.{j}"],
                [route("S", ["S@1.0"], src=f"R@2.{j}")],
                kind="reduce",
                preds=preds,
                input_key=ik,
            )
            for j in range(3)
        ),
        Gate(
            APP,
            2,
            "S@1.0",
            tuple(f"R@2.{j}>S@1.0" for j in range(3)),
            ("R@1.0>S@1.0", "R@1.1>S@1.0"),
        ),
        Switch(
            APP,
            2,
            "D@1.0",
            # the same key function the new instances index their state with
            (route("R", ["R@2.0", "R@2.1", "R@2.2"], "key", ik, src="D@1.0"),),
            (),
            ("D@1.0>R@1.0", "D@1.0>R@1.1"),
        ),
        Retire(APP, 2, "R@1.0", succ, True),
        Retire(APP, 2, "R@1.1", succ, True),
    }


def test_change_partitioning_regenerates_the_receiver() -> None:
    # Records move between S's instances: new instances take over once the old
    # ones drained, so no instance sees a key's records out of order.
    old = model([pe("D", "source"), pe("S", "sink", 2)], [StreamSpec("D", "S")])
    new = model(old.pes, [StreamSpec("D", "S", "broadcast")])
    c, _, _, plan = upgrade(old, new)
    assert c.regenerated == ("S",)
    preds = ("S@1.0", "S@1.1")
    succ = (Successor("S@2.0", "w1"), Successor("S@2.1", "w1"))
    assert plan.prepare == {
        "w1": (
            start("S", 2, 0, 2, ["D@1.0>S@2.0"], [], kind="sink", preds=preds),
            start("S", 2, 1, 2, ["D@1.0>S@2.1"], [], kind="sink", preds=preds),
        )
    }
    assert plan.switch == {
        "w1": (
            Switch(
                APP,
                2,
                "D@1.0",
                (route("S", ["S@2.0", "S@2.1"], "broadcast", src="D@1.0"),),
                (),
                ("D@1.0>S@1.0", "D@1.0>S@1.1"),
            ),
            Retire(APP, 2, "S@1.0", succ, False),
            Retire(APP, 2, "S@1.1", succ, False),
        )
    }


def test_change_to_forward_drops_cross_channels() -> None:
    old = model([pe("D", "source", 2), pe("S", "sink", 2)], [StreamSpec("D", "S")])
    new = model(old.pes, [StreamSpec("D", "S", "forward")])
    c, _, _, plan = upgrade(old, new)
    assert c.regenerated == ("S",)
    preds = ("S@1.0", "S@1.1")
    succ = (Successor("S@2.0", "w1"), Successor("S@2.1", "w1"))
    old_channels = ("D@1.{i}>S@1.0", "D@1.{i}>S@1.1")
    assert instructions(plan) == {
        # the new instance j reads from D's instance j only
        start("S", 2, 0, 2, ["D@1.0>S@2.0"], [], kind="sink", preds=preds),
        start("S", 2, 1, 2, ["D@1.1>S@2.1"], [], kind="sink", preds=preds),
        *(
            Switch(
                APP,
                2,
                f"D@1.{i}",
                (route("S", [f"S@2.{i}"], "forward", src=f"D@1.{i}"),),
                (),
                tuple(ch.format(i=i) for ch in old_channels),
            )
            for i in range(2)
        ),
        Retire(APP, 2, "S@1.0", succ, False),
        Retire(APP, 2, "S@1.1", succ, False),
    }


def test_change_key_function_regenerates_the_keyed_pe() -> None:
    old = model(
        [pe("D", "source"), pe("R", "reduce", keyed=True), pe("S", "sink")],
        [StreamSpec("D", "R", "key", "k1"), StreamSpec("R", "S")],
    )
    new = model(old.pes, [StreamSpec("D", "R", "key", "k2"), StreamSpec("R", "S")])
    c, _, _, plan = upgrade(old, new)
    assert c.regenerated == ("R",)
    (sw,) = [i for i in instructions(plan) if isinstance(i, Switch)]
    # the new key function lives in the new version's bundle
    assert sw.routes[0].key == KeyRef("b2", "D", "R")


# -- epochs: related switches happen at one consistent cut ----------------------


def test_reroute_through_a_sibling_aligns_on_an_epoch() -> None:
    # src->audit and src->enrich become src->enrich->audit. src stops sending to
    # audit at its position P; enrich must add its route to audit exactly at P too,
    # or audit loses (or doubles) the records around P. So src sends an epoch
    # marker to enrich as it switches, and enrich switches when the marker arrives.
    old = model(
        [pe("src", "source"), pe("enrich", par=2), pe("audit", "sink"), pe("out", "sink")],
        [StreamSpec("src", "audit"), StreamSpec("src", "enrich"), StreamSpec("enrich", "out")],
    )
    new = model(
        old.pes,
        [StreamSpec("src", "enrich"), StreamSpec("enrich", "audit"), StreamSpec("enrich", "out")],
    )
    c, old_pl, new_pl, plan = upgrade(old, new)
    assert c.regenerated == ()
    assert plan.prepare == {
        "w1": (
            Gate(
                APP,
                2,
                "audit@1.0",
                ("enrich@1.0>audit@1.0", "enrich@1.1>audit@1.0"),
                ("src@1.0>audit@1.0",),
            ),
        )
    }
    assert plan.switch == {
        "w1": (
            *(
                Switch(
                    APP,
                    2,
                    f"enrich@1.{j}",
                    (route("audit", ["audit@1.0"], src=f"enrich@1.{j}"),),
                    (),
                    (),
                    after_epoch=(f"src@1.0>enrich@1.{j}",),
                )
                for j in range(2)
            ),
            Switch(
                APP,
                2,
                "src@1.0",
                (),
                ("audit",),
                ("src@1.0>audit@1.0",),
                epoch_out=("src@1.0>enrich@1.0", "src@1.0>enrich@1.1"),
            ),
        )
    }
    check_plan(old, old_pl, new, new_pl, c, plan)


def test_moving_an_input_between_siblings_aligns_both_on_their_common_source() -> None:
    # sink reads from e1, then from e2; both are fed by src. e1 must stop and e2
    # start at the same record of src: src switches first (nothing to change but
    # the epoch it sends), each of e1 and e2 switches when its epoch arrives.
    pes = [pe("src", "source"), pe("e1"), pe("e2"), pe("sink", "sink"), pe("log", "sink")]
    common = [StreamSpec("src", "e1"), StreamSpec("src", "e2"), StreamSpec("e1", "log")]
    old = model(pes, [*common, StreamSpec("e1", "sink"), StreamSpec("e2", "log")])
    new = model(pes, [*common, StreamSpec("e2", "sink"), StreamSpec("e2", "log")])
    c, old_pl, new_pl, plan = upgrade(old, new)
    assert plan.prepare == {
        "w1": (Gate(APP, 2, "sink@1.0", ("e2@1.0>sink@1.0",), ("e1@1.0>sink@1.0",)),)
    }
    assert plan.switch == {
        "w1": (
            Switch(
                APP,
                2,
                "e1@1.0",
                (),
                ("sink",),
                ("e1@1.0>sink@1.0",),
                after_epoch=("src@1.0>e1@1.0",),
            ),
            Switch(
                APP,
                2,
                "e2@1.0",
                (route("sink", ["sink@1.0"], src="e2@1.0"),),
                (),
                (),
                after_epoch=("src@1.0>e2@1.0",),
            ),
            Switch(APP, 2, "src@1.0", (), (), (), epoch_out=("src@1.0>e1@1.0", "src@1.0>e2@1.0")),
        )
    }
    check_plan(old, old_pl, new, new_pl, c, plan)


def test_epochs_start_at_the_kept_root_when_the_source_is_replaced() -> None:
    # Same move, while the source gets new code: the old source is no part of the
    # cut (it retires), so the common kept ancestor m emits the epoch.
    pes = [pe("src", "source"), pe("m"), pe("e1"), pe("e2"), pe("sink", "sink"), pe("log", "sink")]
    common = [
        StreamSpec("src", "m"),
        StreamSpec("m", "e1"),
        StreamSpec("m", "e2"),
        StreamSpec("e1", "log"),
        StreamSpec("e2", "log"),
    ]
    old = model(pes, [*common, StreamSpec("e1", "sink")])
    new_pes = [dataclasses.replace(p, fingerprint="g") if p.name == "src" else p for p in pes]
    new = model(new_pes, [*common, StreamSpec("e2", "sink")])
    c, old_pl, new_pl, plan = upgrade(old, new)
    assert c.regenerated == ("src",)
    epochs = {
        i.instance: (i.after_epoch, i.epoch_out)
        for i in instructions(plan)
        if isinstance(i, Switch)
    }
    assert epochs == {
        "m@1.0": ((), ("m@1.0>e1@1.0", "m@1.0>e2@1.0")),
        "e1@1.0": (("m@1.0>e1@1.0",), ()),
        "e2@1.0": (("m@1.0>e2@1.0",), ()),
    }
    check_plan(old, old_pl, new, new_pl, c, plan)


def test_unrelated_switches_need_no_epochs() -> None:
    # a and b both get a new branch, but share no kept ancestor: no cut to align.
    pes = [
        pe("src1", "source"),
        pe("src2", "source"),
        pe("a"),
        pe("b"),
        pe("s1", "sink"),
        pe("s2", "sink"),
    ]
    streams = [
        StreamSpec("src1", "a"),
        StreamSpec("src2", "b"),
        StreamSpec("a", "s1"),
        StreamSpec("b", "s2"),
    ]
    old = model(pes, streams)
    new = model(
        [*pes, pe("t1", "sink"), pe("t2", "sink")],
        [*streams, StreamSpec("a", "t1"), StreamSpec("b", "t2")],
    )
    c, old_pl, new_pl, plan = upgrade(old, new)
    assert {i for i in instructions(plan) if isinstance(i, Switch)} == {
        Switch(APP, 2, "a@1.0", (route("t1", ["t1@2.0"], src="a@1.0"),), (), ()),
        Switch(APP, 2, "b@1.0", (route("t2", ["t2@2.0"], src="b@1.0"),), (), ()),
    }
    check_plan(old, old_pl, new, new_pl, c, plan)


DIAMOND = model(
    [pe("D", "source"), pe("A", par=2), pe("B"), pe("S", "sink")],
    [StreamSpec("D", "A"), StreamSpec("D", "B"), StreamSpec("A", "S"), StreamSpec("B", "S")],
)


@pytest.mark.parametrize("change", ["insert", "rescale", "code"])
def test_a_single_switching_pe_needs_no_epochs(change: str) -> None:
    # One kept PE switches (A for the insert, D otherwise): its batch boundary is
    # the cut, whatever else runs beside it.
    if change == "insert":
        new = model(
            [*DIAMOND.pes, pe("T")],
            [
                StreamSpec("D", "A"),
                StreamSpec("D", "B"),
                StreamSpec("A", "T"),
                StreamSpec("T", "S"),
                StreamSpec("B", "S"),
            ],
        )
    else:
        what = {"parallelism": 3} if change == "rescale" else {"fingerprint": "g"}
        new = model(
            [dataclasses.replace(p, **what) if p.name == "A" else p for p in DIAMOND.pes],
            DIAMOND.streams,
        )
    c, old_pl, new_pl, plan = upgrade(DIAMOND, new)
    switches = [i for i in instructions(plan) if isinstance(i, Switch)]
    assert {parse_instance_id(i.instance)[0] for i in switches} == (
        {"A"} if change == "insert" else {"D"}
    )
    assert all(i.after_epoch == i.epoch_out == () for i in switches)
    check_plan(DIAMOND, old_pl, new, new_pl, c, plan)


def test_replace_source() -> None:
    new = model([pe("D2", "source"), pe("S", "sink")], [StreamSpec("D2", "S")])
    _, _, _, plan = upgrade(DS, new)
    assert instructions(plan) == {
        start("D2", 2, 0, 1, [], [route("S", ["S@1.0"], src="D2@2.0")], kind="source"),
        Gate(APP, 2, "S@1.0", ("D2@2.0>S@1.0",), ("D@1.0>S@1.0",)),
        Retire(APP, 2, "D@1.0", (), False),
    }


def test_replace_sink() -> None:
    new = model([pe("D", "source"), pe("S2", "sink")], [StreamSpec("D", "S2")])
    _, _, _, plan = upgrade(DS, new)
    assert instructions(plan) == {
        start("S2", 2, 0, 1, ["D@1.0>S2@2.0"], [], kind="sink"),
        Switch(APP, 2, "D@1.0", (route("S2", ["S2@2.0"], src="D@1.0"),), ("S",), ("D@1.0>S@1.0",)),
        Retire(APP, 2, "S@1.0", (), False),
    }


def test_no_change_no_plan() -> None:
    c, _, _, plan = upgrade(CHAIN, CHAIN)
    assert c.is_empty
    assert plan.count() == 0 and plan.workers == set()


def test_instructions_go_to_the_hosting_worker_only() -> None:
    workers = {"a": 1, "b": 1, "c": 1, "d": 1}
    old = model(
        [pe("D", "source"), pe("M"), pe("S", "sink"), pe("X")],
        [StreamSpec("D", "M"), StreamSpec("M", "S"), StreamSpec("D", "X"), StreamSpec("X", "S")],
    )
    new = model([pe("D", "source"), pe("M", fp="g"), pe("S", "sink"), pe("X")], old.streams)
    _, old_pl, _, plan = upgrade(old, new, workers)
    assert old_pl["X"].workers[0] not in plan.workers
    assert plan.workers == {old_pl[p].workers[0] for p in ("D", "M", "S")}


def test_plan_stop() -> None:
    pl = schedule(CHAIN, {}, diff(empty(), CHAIN), {"a": 9, "b": 9, "c": 9}, 1, "h")
    assert plan_stop(APP, 3, pl) == {w: (StopApp(APP, 3),) for w in ("a", "b", "c")}
    assert plan_stop(APP, 3, {}) == {}


def test_instructions_round_trip_the_wire() -> None:
    old = model(
        [pe("D", "source"), pe("R", "reduce", 2, keyed=True), pe("S", "sink")],
        [StreamSpec("D", "R", "key", "k"), StreamSpec("R", "S")],
    )
    new = model([pe("D", "source"), pe("R", "reduce", 3, keyed=True), pe("S", "sink")], old.streams)
    _, _, _, plan = upgrade(old, new)
    for ins in instructions(plan):
        assert from_wire(to_wire(ins)) == ins
        assert from_pb(pb.Instruction.FromString(to_pb(ins).SerializeToString())) == ins


def test_typed_instructions_carry_config_and_restart_state() -> None:
    ins = StartInstance(
        APP,
        2,
        "R",
        "reduce",
        2,
        1,
        3,
        "h",
        ("a>b",),
        (),
        ("R@1.0",),
        config={"on_error": "fail", "n": [1, 2]},
        initial_state=[[[1078, {"x": 1}], [(1, "a"), 2]]],
    )
    back = from_pb(pb.Instruction.FromString(to_pb(ins).SerializeToString()))
    assert back == ins and back.config == {"on_error": "fail", "n": [1, 2]}
    assert back.initial_state == [[[1078, {"x": 1}], [[1, "a"], 2]]]


def test_an_instruction_of_an_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(WireError, match="the master may run a newer hotwire"):
        from_pb(pb.Instruction())


# ---------------------------------------------------------------------------
# Properties over random topologies and mutations
# ---------------------------------------------------------------------------

MIDDLE_KINDS = ["map", "filter", "flat_map", "reduce", "process", "union"]
PARTS = ["shuffle", "key", "broadcast", "forward"]


@dataclass
class Topo:
    """A mutable topology; ``rank`` orders PEs so every stream goes up (a DAG)."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # [partition, key fp]
    counter: int = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def add(self, name: str, kind: str, rank: float, par: int) -> None:
        self.nodes[name] = {"kind": kind, "rank": rank, "par": par, "fp": "f", "config": {}}

    def kind(self, n: str) -> str:
        return str(self.nodes[n]["kind"])

    def preds(self, n: str) -> list[str]:
        return sorted(u for u, v in self.edges if v == n)

    def succs(self, n: str) -> list[str]:
        return sorted(v for u, v in self.edges if u == n)

    def drop(self, n: str) -> None:
        del self.nodes[n]
        self.edges = {e: p for e, p in self.edges.items() if n not in e}

    def later(self, u: str) -> list[str]:
        r = self.nodes[u]["rank"]
        return sorted(n for n, a in self.nodes.items() if a["rank"] > r and a["kind"] != "source")

    def earlier(self, v: str) -> list[str]:
        r = self.nodes[v]["rank"]
        return sorted(n for n, a in self.nodes.items() if a["rank"] < r and a["kind"] != "sink")

    def repair(self, draw: st.DrawFn) -> None:
        for n in sorted(self.nodes, key=lambda n: self.nodes[n]["rank"]):
            if self.kind(n) != "source" and not self.preds(n):
                self.edges[draw(st.sampled_from(self.earlier(n))), n] = ["shuffle", ""]
        for n in sorted(self.nodes, key=lambda n: self.nodes[n]["rank"]):
            if self.kind(n) != "sink" and not self.succs(n):
                self.edges[n, draw(st.sampled_from(self.later(n)))] = ["shuffle", ""]
        for (u, v), p in self.edges.items():
            if p[0] == "forward" and self.nodes[u]["par"] != self.nodes[v]["par"]:
                p[0] = "shuffle"
            if p[0] != "key":
                p[1] = ""
            elif not p[1]:
                p[1] = "k"

    def model(self) -> LogicalModel:
        pes = [
            PESpec(
                n,
                a["kind"],
                a["par"],
                a["fp"],
                f"fn_{n}",
                dict(a["config"]),
                any(p[0] == "key" for (_, v), p in self.edges.items() if v == n),
            )
            for n, a in sorted(self.nodes.items())
        ]
        streams = [StreamSpec(u, v, p[0], p[1]) for (u, v), p in sorted(self.edges.items())]
        m = LogicalModel.build(APP, pes, streams)
        assert check_structure(m) == []
        return m

    def copy(self) -> Topo:
        return Topo(
            {n: dict(a) for n, a in self.nodes.items()},
            {e: list(p) for e, p in self.edges.items()},
            self.counter,
        )


def draw_topology(draw: st.DrawFn) -> Topo:
    t = Topo()
    for i in range(draw(st.integers(1, 3))):
        t.add(f"src{i}", "source", 0.1 * i, draw(st.integers(1, 4)))
    for i in range(draw(st.integers(0, 6))):
        t.add(f"m{i}", draw(st.sampled_from(MIDDLE_KINDS)), 1 + i, draw(st.integers(1, 4)))
    for i in range(draw(st.integers(1, 2))):
        t.add(f"sink{i}", "sink", 1000 + i, draw(st.integers(1, 4)))
    for v in sorted(t.nodes):
        if t.kind(v) == "source":
            continue
        for u in draw(st.lists(st.sampled_from(t.earlier(v)), min_size=1, max_size=2, unique=True)):
            t.edges[u, v] = [draw(st.sampled_from(PARTS)), ""]
    t.repair(draw)
    return t


def mutate(t: Topo, draw: st.DrawFn) -> None:
    op = draw(
        st.sampled_from(
            [
                "insert",
                "branch",
                "remove_mid",
                "remove_sink",
                "code",
                "config",
                "rescale",
                "partition",
                "reroute",
                "replace_source",
                "replace_sink",
                "key_fn",
                "add_edge",
            ]
        )
    )
    nodes = sorted(t.nodes)
    edges = sorted(t.edges)
    mids = [n for n in nodes if t.kind(n) not in ("source", "sink")]
    sinks = [n for n in nodes if t.kind(n) == "sink"]
    sources = [n for n in nodes if t.kind(n) == "source"]
    if op == "insert":
        u, v = draw(st.sampled_from(edges))
        n = t.fresh("ins")
        t.add(
            n,
            draw(st.sampled_from(MIDDLE_KINDS)),
            (t.nodes[u]["rank"] + t.nodes[v]["rank"]) / 2,
            draw(st.integers(1, 4)),
        )
        del t.edges[u, v]
        t.edges[u, n] = [draw(st.sampled_from(PARTS)), ""]
        t.edges[n, v] = [draw(st.sampled_from(PARTS)), ""]
    elif op == "branch":
        u = draw(st.sampled_from([n for n in nodes if t.kind(n) != "sink"]))
        n = t.fresh("br")
        t.add(n, "sink", 2000 + t.counter, draw(st.integers(1, 4)))
        t.edges[u, n] = [draw(st.sampled_from(PARTS)), ""]
    elif op == "remove_mid" and mids:
        n = draw(st.sampled_from(mids))
        ps, ss = t.preds(n), t.succs(n)
        t.drop(n)
        for u in ps:
            for v in ss:
                t.edges.setdefault((u, v), ["shuffle", ""])
    elif op == "remove_sink" and len(sinks) > 1:
        t.drop(draw(st.sampled_from(sinks)))
    elif op in ("code", "config"):
        n = draw(st.sampled_from(nodes))
        if op == "code":
            t.nodes[n]["fp"] += "'"
        else:
            t.nodes[n]["config"] = {"v": t.counter + 1}
            t.counter += 1
    elif op == "rescale":
        n = draw(st.sampled_from(nodes))
        t.nodes[n]["par"] = draw(st.integers(1, 4))
    elif op == "partition":
        e = draw(st.sampled_from(edges))
        t.edges[e][0] = draw(st.sampled_from(PARTS))
    elif op == "reroute":
        u, v = draw(st.sampled_from(edges))
        choices = [w for w in t.later(u) if w != v and (u, w) not in t.edges]
        if choices:
            p = t.edges.pop((u, v))
            t.edges[u, draw(st.sampled_from(choices))] = p
    elif op == "replace_source" or op == "replace_sink":
        n = draw(st.sampled_from(sources if op == "replace_source" else sinks))
        a = t.nodes[n]
        ps, ss = t.preds(n), t.succs(n)
        old_edges = {e: p for e, p in t.edges.items() if n in e}
        t.drop(n)
        m = t.fresh("new")
        t.add(m, a["kind"], a["rank"], a["par"])
        for (u, v), p in old_edges.items():
            t.edges[(m if u == n else u), (m if v == n else v)] = list(p)
        assert len(ps) + len(ss) == len(old_edges)
    elif op == "key_fn":
        keyed = [e for e in edges if t.edges[e][0] == "key"]
        if keyed:
            t.edges[draw(st.sampled_from(keyed))][1] += "'"
    elif op == "add_edge":
        u = draw(st.sampled_from([n for n in nodes if t.kind(n) != "sink"]))
        choices = [w for w in t.later(u) if (u, w) not in t.edges]
        if choices:
            t.edges[u, draw(st.sampled_from(choices))] = [draw(st.sampled_from(PARTS)), ""]
    t.repair(draw)


# -- a tiny physical simulator -----------------------------------------------------

State = dict[str, tuple[set[str], dict[str, tuple[str, tuple[str, ...]]]]]


def physical(m: LogicalModel, pl: Placement) -> State:
    """Every instance's input channels and routes, computed from scratch."""

    def chans(s: StreamSpec) -> set[tuple[int, int, str]]:
        a, b = pl[s.src], pl[s.dst]
        return {
            (i, j, f"{a.instance(s.src, i)}>{b.instance(s.dst, j)}")
            for i in range(a.parallelism)
            for j in range(b.parallelism)
            if s.partition != "forward" or i == j
        }

    state: State = {}
    for n in m.graph.nodes:
        p = pl[n]
        for i in range(p.parallelism):
            ins = {c for s in m.inputs(n) for (_, j, c) in chans(s) if j == i}
            routes = {
                s.dst: (s.partition, tuple(c for (a, _, c) in sorted(chans(s)) if a == i))
                for s in m.outputs(n)
            }
            state[p.instance(n, i)] = (ins, routes)
    return state


def apply(state: State, plan: Plan) -> State:
    s = {k: (set(v[0]), dict(v[1])) for k, v in state.items()}
    for phase in (plan.prepare, plan.switch):
        for _, batch in sorted(phase.items()):
            for ins in batch:
                if isinstance(ins, StartInstance):
                    assert ins.instance not in s
                    s[ins.instance] = (
                        set(ins.inputs),
                        {
                            r.dst_pe: (r.partition, tuple(t.channel for t in r.targets))
                            for r in ins.routes
                        },
                    )
                elif isinstance(ins, Gate):
                    inputs = s[ins.instance][0]
                    assert set(ins.disappearing) <= inputs
                    assert not set(ins.appearing) & inputs
                    inputs -= set(ins.disappearing)
                    inputs |= set(ins.appearing)
                elif isinstance(ins, Switch):
                    # after_epoch / epoch_out say *when* to switch, not what
                    routes = s[ins.instance][1]
                    current = {c for _, cs in routes.values() for c in cs}
                    assert set(ins.ended) <= current
                    for d in ins.unrouted:
                        del routes[d]
                    for r in ins.routes:
                        routes[r.dst_pe] = (r.partition, tuple(t.channel for t in r.targets))
                else:
                    assert isinstance(ins, Retire)
                    del s[ins.instance]
    return s


def check_plan(
    old: LogicalModel,
    old_pl: Placement,
    new: LogicalModel,
    new_pl: Placement,
    c: ChangeSet,
    plan: Plan,
) -> None:
    before, after = physical(old, old_pl), physical(new, new_pl)
    assert apply(before, plan) == after
    regen = set(c.regenerated)
    changed_streams = set(c.streams_changed)
    for w, ins in (*plan.prepare.items(), *plan.switch.items()):
        assert ins, w
        for i in ins:
            if isinstance(i, StartInstance):
                assert new_pl[i.pe].workers[i.index] == w
                assert i.gen == 2 and i.pe in set(c.pes_added) | regen
                old_p = old_pl.get(i.pe)
                expected = (
                    tuple(old_p.instance(i.pe, k) for k in range(old_p.parallelism))
                    if i.pe in regen and old_p
                    else ()
                )
                assert i.predecessors == expected
                continue
            pe_, gen, idx = parse_instance_id(i.instance)  # type: ignore[union-attr]
            if isinstance(i, Retire):
                assert old_pl[pe_].workers[idx] == w and gen == old_pl[pe_].gen
                assert pe_ in set(c.pes_removed) | regen
                if pe_ in regen:
                    assert {s.instance for s in i.successors} == {
                        new_pl[pe_].instance(pe_, k) for k in range(new_pl[pe_].parallelism)
                    }
                continue
            # kept instance: same placement both sides, and its state really changes
            assert old_pl[pe_] == new_pl[pe_] and new_pl[pe_].workers[idx] == w
            if isinstance(i, Gate):
                assert before[i.instance][0] != after[i.instance][0]
            else:
                assert isinstance(i, Switch)
                assert (
                    before[i.instance][1] != after[i.instance][1]
                    or any(f"{pe_}->{d}" in changed_streams for d in after[i.instance][1])
                    or i.after_epoch
                    or i.epoch_out
                )
    check_epochs(before, after, plan)
    # every instance whose state changed is reached by the plan
    touched = {getattr(i, "instance", None) for i in instructions(plan)}
    for iid in before.keys() & after.keys():
        if before[iid] != after[iid]:
            assert iid in touched


def check_epochs(before: State, after: State, plan: Plan) -> None:
    """Epoch markers: each one sent is awaited by its receiver and each one awaited
    is sent, only on channels that survive the upgrade, and only when several kept
    PEs change their routes."""
    switches = [i for i in instructions(plan) if isinstance(i, Switch)]
    sent: set[str] = set()
    awaited: set[str] = set()
    for sw in switches:
        assert list(sw.after_epoch) == sorted(set(sw.after_epoch))
        assert list(sw.epoch_out) == sorted(set(sw.epoch_out))
        assert not set(sw.ended) & set(sw.epoch_out)
        for ch in sw.epoch_out:
            assert ch.split(">")[0] == sw.instance
            sent.add(ch)
        for ch in sw.after_epoch:
            assert ch.split(">")[1] == sw.instance
            awaited.add(ch)
    assert sent == awaited
    for ch in sent:
        src, dst = ch.split(">")
        assert ch in before[dst][0] and ch in after[dst][0]
        assert any(ch in cs for _, cs in before[src][1].values())
        assert any(ch in cs for _, cs in after[src][1].values())
    if any(sw.after_epoch or sw.epoch_out for sw in switches):
        rerouting = {
            parse_instance_id(sw.instance)[0]
            for sw in switches
            if before[sw.instance][1] != after[sw.instance][1] or sw.routes or sw.unrouted
        }
        assert len(rerouting) >= 2


@settings(deadline=None, max_examples=150)
@given(st.data())
def test_plan_turns_old_physical_state_into_new(data: st.DataObject) -> None:
    t = draw_topology(data.draw)
    old = t.model()
    t2 = t.copy()
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(t2, data.draw)
    new = t2.model()
    workers = {"w1": 100, "w2": 100, "w3": 100}

    c = diff(old, new)
    # (1) the change set is exactly the difference
    on, nn = set(old.graph.nodes), set(new.graph.nodes)
    assert (on - set(c.pes_removed)) | set(c.pes_added) == nn
    for n in on & nn:
        same = old.pe(n) == new.pe(n)
        in_any = any(n in lst for lst in (c.pes_changed, c.pes_rescaled))
        assert same != in_any
    oe, ne = set(old.graph.edges), set(new.graph.edges)
    assert (oe - {tuple(s.split("->")) for s in c.streams_removed}) | {
        tuple(s.split("->")) for s in c.streams_added
    } == ne
    for u, v in oe & ne:
        assert (old.stream(u, v) != new.stream(u, v)) == (f"{u}->{v}" in c.streams_changed)

    # (2) applying the plan to the old physical state yields the new one
    old_pl, first = submit(old, workers)
    assert {type(i) for i in instructions(first)} == {StartInstance}
    assert apply({}, first) == physical(old, old_pl)
    new_pl = schedule(new, old_pl, c, workers, 2, "b2")
    plan = plan_upgrade(APP, 2, old, old_pl, new, new_pl, c)
    # (3) instructions only on hosting workers, only for affected instances
    check_plan(old, old_pl, new, new_pl, c, plan)
    for ins in instructions(plan):
        assert from_wire(to_wire(ins)) == ins
        assert from_pb(to_pb(ins)) == ins


def chain(n: int, changed: str | None = None) -> LogicalModel:
    names = [f"p{i:03d}" for i in range(n)]
    pes = [
        pe(names[0], "source", 2),
        *(pe(x, par=2) for x in names[1:-1]),
        pe(names[-1], "sink", 2),
    ]
    pes = [dataclasses.replace(p, fingerprint="g") if p.name == changed else p for p in pes]
    return model(pes, [StreamSpec(a, b) for a, b in itertools.pairwise(names)])


@pytest.mark.parametrize("where", ["source", "middle", "sink"])
def test_plan_size_follows_the_change_not_the_topology(where: str) -> None:
    workers = {f"w{i}": 1000 for i in range(5)}
    counts = []
    for n in (10, 200):
        index = {"source": 0, "middle": 5, "sink": n - 1}[where]
        old, new = chain(n), chain(n, f"p{index:03d}")
        c, old_pl, new_pl, plan = upgrade(old, new, workers)
        check_plan(old, old_pl, new, new_pl, c, plan)
        counts.append(plan.count())
    assert counts[0] == counts[1]


def test_key_function_change_into_an_unkeyed_pe_regenerates_it() -> None:
    old = model(
        [pe("D", "source"), pe("M", par=2), pe("S", "sink")],
        [StreamSpec("D", "M", "key", "k1"), StreamSpec("M", "S")],
    )
    new = model(old.pes, [StreamSpec("D", "M", "key", "k2"), StreamSpec("M", "S")])
    c, _, _, plan = upgrade(old, new)
    assert c.streams_changed == ("D->M",) and c.regenerated == ("M",)
    # the new key function lives in the new bundle only: sender and receivers use it
    key = KeyRef("b2", "D", "M")
    preds = ("M@1.0", "M@1.1")
    succ = (Successor("M@2.0", "w1"), Successor("M@2.1", "w1"))
    assert instructions(plan) == {
        *(
            start(
                "M",
                2,
                j,
                2,
                [f"D@1.0>M@2.{j}"],
                [route("S", ["S@1.0"], src=f"M@2.{j}")],
                preds=preds,
                input_key=key,
            )
            for j in range(2)
        ),
        Gate(APP, 2, "S@1.0", ("M@2.0>S@1.0", "M@2.1>S@1.0"), ("M@1.0>S@1.0", "M@1.1>S@1.0")),
        Switch(
            APP,
            2,
            "D@1.0",
            (route("M", ["M@2.0", "M@2.1"], "key", key, src="D@1.0"),),
            (),
            ("D@1.0>M@1.0", "D@1.0>M@1.1"),
        ),
        Retire(APP, 2, "M@1.0", succ, False),
        Retire(APP, 2, "M@1.1", succ, False),
    }


def test_new_key_stream_between_kept_pes_uses_the_new_bundle() -> None:
    # Removing M from D -key-> M -key-> R leaves R's state where it is (same key
    # function) and adds the stream D -> R, whose key function only the new bundle has.
    old = model(
        [pe("D", "source"), pe("M", par=2), pe("R", par=2, keyed=True), pe("S", "sink")],
        [
            StreamSpec("D", "M", "key", "k1"),
            StreamSpec("M", "R", "key", "k1"),
            StreamSpec("R", "S"),
        ],
    )
    new = model(
        [pe("D", "source"), pe("R", par=2, keyed=True), pe("S", "sink")],
        [StreamSpec("D", "R", "key", "k1"), StreamSpec("R", "S")],
    )
    c, _, _, plan = upgrade(old, new)
    assert c.regenerated == ()
    switches = [i for i in instructions(plan) if isinstance(i, Switch)]
    assert switches and all(r.key == KeyRef("b2", "D", "R") for s in switches for r in s.routes)


# ---------------------------------------------------------------------------
# Renames: the new name's instances take over the old name's state
# ---------------------------------------------------------------------------


def test_rename_hands_state_to_the_new_name() -> None:
    old = model(
        [pe("D", "source"), pe("R", "reduce", 2, keyed=True), pe("S", "sink")],
        [StreamSpec("D", "R", "key", "k"), StreamSpec("R", "S")],
    )
    new = model(
        [pe("D", "source"), pe("T", "reduce", 3, keyed=True, renamed_from="R"), pe("S", "sink")],
        [StreamSpec("D", "T", "key", "k"), StreamSpec("T", "S")],
    )
    c, _, new_pl, plan = upgrade(old, new)
    assert c.pes_renamed == (("R", "T"),) and c.pes_rescaled == ("T",)
    assert new_pl["T"].gen == 2 and "R" not in new_pl
    preds = ("R@1.0", "R@1.1")
    succ = tuple(Successor(f"T@2.{j}", "w1") for j in range(3))
    assert instructions(plan) == {
        *(
            start(
                "T",
                2,
                j,
                3,
                [f"D@1.0>T@2.{j}"],
                [route("S", ["S@1.0"], src=f"T@2.{j}")],
                kind="reduce",
                preds=preds,
                input_key=KeyRef("b2", "D", "T"),
            )
            for j in range(3)
        ),
        Gate(
            APP,
            2,
            "S@1.0",
            tuple(f"T@2.{j}>S@1.0" for j in range(3)),
            ("R@1.0>S@1.0", "R@1.1>S@1.0"),
        ),
        Switch(
            APP,
            2,
            "D@1.0",
            (
                route(
                    "T",
                    [f"T@2.{j}" for j in range(3)],
                    "key",
                    KeyRef("b2", "D", "T"),
                    src="D@1.0",
                ),
            ),
            ("R",),
            ("D@1.0>R@1.0", "D@1.0>R@1.1"),
        ),
        Retire(APP, 2, "R@1.0", succ, True),
        Retire(APP, 2, "R@1.1", succ, True),
    }
    moves = state_moves(plan, old, {"R@1.0": 10, "R@1.1": 20})
    assert moves == [StateMove("R", "T", 2, 3, True, 30)]
    assert moves[0].describe() == (
        "state of 'R' (2 instance(s), 30 bytes at the last checkpoint) -> 'T' (3 instance(s)), "
        "split by key"
    )


def test_rename_keeps_instances_on_their_workers() -> None:
    old = model(
        [pe("D", "source"), pe("R", "reduce", 2, keyed=True), pe("S", "sink")],
        [StreamSpec("D", "R", "key", "k"), StreamSpec("R", "S")],
    )
    new = model(
        [pe("D", "source"), pe("T", "reduce", 2, keyed=True, renamed_from="R"), pe("S", "sink")],
        [StreamSpec("D", "T", "key", "k"), StreamSpec("T", "S")],
    )
    _, old_pl, new_pl, _ = upgrade(old, new, {"a": 3, "b": 3})
    assert new_pl["T"].workers == old_pl["R"].workers


def test_state_moves_of_a_removal_and_of_stateless_pes() -> None:
    old = model(
        [pe("D", "source"), pe("M"), pe("R", "reduce", 2, keyed=True), pe("S", "sink")],
        [StreamSpec("D", "M"), StreamSpec("M", "R", "key", "k"), StreamSpec("R", "S")],
    )
    new = model(
        [pe("D", "source"), pe("M", fp="g"), pe("S", "sink")],
        [StreamSpec("D", "M"), StreamSpec("M", "S")],
    )
    _, _, _, plan = upgrade(old, new)
    # 'M' (a map) holds nothing: not listed; 'R' is dropped, its size unknown
    assert state_moves(plan, old) == [StateMove("R", "", 2, 0, True, None)]
    assert state_moves(plan, old)[0].describe() == (
        "state of 'R' (2 instance(s), size unknown): dropped"
    )
    # a stateless kind that held state at the checkpoint (a transactional sink, say) is listed
    sizes = {"M@1.0": 7, "R@1.0": 1, "R@1.1": 0}
    assert state_moves(plan, old, sizes) == [
        StateMove("M", "M", 1, 1, False, 7),
        StateMove("R", "", 2, 0, True, 1),
    ]
