"""diff(old, new) -> ChangeSet: unit cases and a property over random model pairs."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotwire.master.diff import (
    ChangeSet,
    diff,
    relabel,
    renamed_states,
    split_stream_name,
    stream_name,
)
from hotwire.model import LogicalModel, PESpec, StreamSpec, check_structure


def pe(name: str, kind: str = "map", par: int = 1, fp: str = "f", **kw: object) -> PESpec:
    return PESpec(name, kind, par, fp, f"fn_{name}", **kw)  # type: ignore[arg-type]


def model(pes: list[PESpec], streams: list[StreamSpec], app: str = "orders") -> LogicalModel:
    m = LogicalModel.build(app, pes, streams)
    assert check_structure(m) == []
    return m


EMPTY = LogicalModel.build("orders", [], [])
BASE = model(
    [pe("raw", "source"), pe("clean"), pe("totals", "reduce", 2, keyed=True), pe("out", "sink")],
    [
        StreamSpec("raw", "clean"),
        StreamSpec("clean", "totals", "key", "k1"),
        StreamSpec("totals", "out"),
    ],
)


def with_pe(m: LogicalModel, name: str, **changes: object) -> LogicalModel:
    pes = [dataclasses.replace(p, **changes) if p.name == name else p for p in m.pes]  # type: ignore[arg-type]
    return model(pes, m.streams)


def test_identical_models_give_an_empty_change_set() -> None:
    c = diff(BASE, BASE)
    assert c.is_empty
    assert c == ChangeSet()
    assert c.describe() == []


def test_first_submit_adds_everything() -> None:
    c = diff(EMPTY, BASE)
    assert c.pes_added == ("clean", "out", "raw", "totals")
    assert c.streams_added == ("clean->totals", "raw->clean", "totals->out")
    assert c.pes_removed == c.pes_changed == c.pes_rescaled == c.regenerated == ()
    assert not c.is_empty


def test_code_change() -> None:
    c = diff(BASE, with_pe(BASE, "clean", fingerprint="g"))
    assert c.pes_changed == ("clean",)
    assert c.regenerated == ("clean",)
    assert c.describe() == ["~ pe 'clean' (code)"]


def test_config_change() -> None:
    c = diff(BASE, with_pe(BASE, "clean", config={"x": 1}))
    assert c.pes_changed == ("clean",)
    assert c.describe() == ["~ pe 'clean' (config)"]


def test_rescale_is_not_a_code_change() -> None:
    c = diff(BASE, with_pe(BASE, "totals", parallelism=3))
    assert c.pes_changed == ()
    assert c.pes_rescaled == ("totals",)
    assert c.regenerated == ("totals",)
    assert c.describe() == ["↕ pe 'totals' 2 -> 3"]


def test_change_and_rescale_together() -> None:
    c = diff(BASE, with_pe(BASE, "clean", fingerprint="g", parallelism=2))
    assert c.pes_changed == c.pes_rescaled == c.regenerated == ("clean",)


def test_insert_pe_into_stream() -> None:
    new = model(
        [*BASE.pes, pe("enrich")],
        [
            StreamSpec("raw", "enrich"),
            StreamSpec("enrich", "clean"),
            StreamSpec("clean", "totals", "key", "k1"),
            StreamSpec("totals", "out"),
        ],
    )
    c = diff(BASE, new)
    assert c.pes_added == ("enrich",)
    assert c.streams_added == ("enrich->clean", "raw->enrich")
    assert c.streams_removed == ("raw->clean",)
    assert c.regenerated == ()  # clean is not keyed
    assert c.describe() == [
        "+ pe 'enrich'",
        "+ stream 'enrich->clean'",
        "+ stream 'raw->enrich'",
        "- stream 'raw->clean'",
    ]


def test_keyed_pe_with_a_changed_input_is_regenerated() -> None:
    streams = [
        StreamSpec("raw", "clean"),
        StreamSpec("clean", "totals", "key", "k2"),
        StreamSpec("totals", "out"),
    ]
    c = diff(BASE, model(BASE.pes, streams))
    assert c.streams_changed == ("clean->totals",)
    assert c.pes_changed == ()
    assert c.regenerated == ("totals",)
    assert c.describe() == ["~ stream 'clean->totals' (key)"]


def test_partition_change_regenerates_the_receiver() -> None:
    # Records move between the receiver's instances; new instances take over after
    # the old ones drain, so per-key order survives the change.
    streams = [
        StreamSpec("raw", "clean", "broadcast"),
        StreamSpec("clean", "totals", "key", "k1"),
        StreamSpec("totals", "out"),
    ]
    c = diff(BASE, model(BASE.pes, streams))
    assert c.streams_changed == ("raw->clean",)
    assert c.regenerated == ("clean",)
    assert c.describe() == ["~ stream 'raw->clean' (shuffle -> broadcast)"]


def test_key_function_change_regenerates_an_unkeyed_receiver() -> None:
    # A map after key_by is not keyed, but its instances still get other records.
    m = model(
        [pe("raw", "source"), pe("clean", par=2), pe("out", "sink")],
        [StreamSpec("raw", "clean", "key", "k1"), StreamSpec("clean", "out")],
    )
    streams = [StreamSpec("raw", "clean", "key", "k2"), StreamSpec("clean", "out")]
    c = diff(m, model(m.pes, streams))
    assert c.streams_changed == ("raw->clean",)
    assert c.pes_changed == c.pes_rescaled == ()
    assert c.regenerated == ("clean",)
    # only the receiver: the sender keeps its generation
    assert "raw" not in c.regenerated


def test_removed_pe_and_its_streams() -> None:
    c = diff(BASE, EMPTY)
    assert c.pes_removed == ("clean", "out", "raw", "totals")
    assert c.streams_removed == ("clean->totals", "raw->clean", "totals->out")
    assert c.regenerated == ()


def test_round_trip_through_dict() -> None:
    c = diff(BASE, with_pe(BASE, "totals", parallelism=3, fingerprint="h"))
    d = c.to_dict()
    assert set(d) >= {
        "pes_added",
        "pes_removed",
        "pes_changed",
        "pes_rescaled",
        "streams_added",
        "streams_removed",
        "streams_changed",
        "regenerated",
    }
    assert d["pes_changed"] == ["totals"]
    assert ChangeSet.from_dict(d) == c
    # A record without details still reads, and still describes.
    bare = ChangeSet.from_dict({k: v for k, v in d.items() if k != "details"})
    assert bare.describe() == ["~ pe 'totals'", "↕ pe 'totals'"]


def test_split_stream_name_with_arrows_in_pe_names() -> None:
    # Such names no longer pass check_structure (hotwire.names); the split still handles them.
    m = LogicalModel.build(
        "orders", [pe("a->b", "source"), pe("c", "sink")], [StreamSpec("a->b", "c")]
    )
    assert split_stream_name(stream_name("a->b", "c"), m) == ("a->b", "c")
    assert split_stream_name("x->y") == ("x", "y")


# -- property: the change set is exactly the difference ------------------------------

NAMES = [f"p{i}" for i in range(8)]


@st.composite
def random_models(draw: st.DrawFn) -> LogicalModel:
    """Any DAG over a subset of NAMES (edges go from lower to higher name index)."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    names.sort(key=NAMES.index)
    pes = [
        PESpec(
            n,
            draw(st.sampled_from(["map", "reduce", "union"])),
            draw(st.integers(1, 3)),
            draw(st.sampled_from(["f", "g"])),
            "fn",
            draw(st.sampled_from([{}, {"x": 1}])),
            draw(st.booleans()),
        )
        for n in names
    ]
    streams = [
        StreamSpec(u, v, draw(st.sampled_from(["shuffle", "key", "broadcast"])), "k")
        for i, u in enumerate(names)
        for v in names[i + 1 :]
        if draw(st.booleans())
    ]
    return LogicalModel.build("app", pes, streams)


@settings(deadline=None, max_examples=150)
@given(random_models(), random_models())
def test_change_set_is_the_difference(before: LogicalModel, new: LogicalModel) -> None:
    c = diff(before, new)
    # A rename (here only inferred: same kind, code, config, keying and neighbours)
    # relates one PE that went to one that came; compared under the new name.
    for o, n in c.pes_renamed:
        assert o in before.graph and o not in new.graph
        assert n in new.graph and n not in before.graph
        assert before.pe(o).fingerprint == new.pe(n).fingerprint
    assert set(c.renames_inferred) == set(c.renames.values())
    old = relabel(before, c.renames)
    on, nn = set(old.graph.nodes), set(new.graph.nodes)
    assert (on - set(c.pes_removed)) | set(c.pes_added) == nn
    assert set(c.pes_removed) <= on and not set(c.pes_removed) & nn
    assert set(c.pes_added) <= nn and not set(c.pes_added) & on
    for n in on & nn:
        o, w = old.pe(n), new.pe(n)
        assert (n in c.pes_changed) == (
            dataclasses.replace(o, parallelism=1) != dataclasses.replace(w, parallelism=1)
        )
        assert (n in c.pes_rescaled) == (o.parallelism != w.parallelism)
    oe = {stream_name(u, v) for u, v in old.graph.edges}
    ne = {stream_name(u, v) for u, v in new.graph.edges}
    assert (oe - set(c.streams_removed)) | set(c.streams_added) == ne
    assert set(c.streams_changed) <= oe & ne
    for s in oe & ne:
        u, v = split_stream_name(s, old)
        assert (s in c.streams_changed) == (old.stream(u, v) != new.stream(u, v))
    touched = {
        split_stream_name(s, old, new)[1]
        for s in (*c.streams_added, *c.streams_removed, *c.streams_changed)
    }
    repartitioned = {split_stream_name(s, old, new)[1] for s in c.streams_changed}
    expected_regen = set(c.pes_changed) | set(c.pes_rescaled)

    def key_fns(m: LogicalModel, pe: str) -> set[tuple[str, str]]:
        return {(st.partition, st.key_fingerprint) for st in m.inputs(pe)}

    # a keyed PE whose inputs changed keeps its state unless their key functions changed
    expected_regen |= {
        v
        for v in touched
        if v in on and v in nn and new.pe(v).keyed and key_fns(old, v) != key_fns(new, v)
    }
    # a changed stream regenerates its receiver, keyed or not (it is in both models)
    assert repartitioned <= on & nn
    expected_regen |= repartitioned
    assert set(c.regenerated) == expected_regen - set(c.renames.values())
    for field in dataclasses.fields(c):
        value = getattr(c, field.name)
        assert value == tuple(sorted(value))
    assert ChangeSet.from_dict(c.to_dict()) == c
    assert c.is_empty == (before == new)


# -- renames -----------------------------------------------------------------------


def renamed(
    m: LogicalModel, old: str, new: str, declared: bool = True, **changes: object
) -> LogicalModel:
    """``m`` with PE ``old`` called ``new`` (declared with ``renamed_from`` or not)."""

    def name(x: str) -> str:
        return new if x == old else x

    pes = [
        dataclasses.replace(
            p,
            name=new,
            renamed_from=old if declared else "",
            **changes,  # type: ignore[arg-type]
        )
        if p.name == old
        else p
        for p in m.pes
    ]
    streams = [dataclasses.replace(s, src=name(s.src), dst=name(s.dst)) for s in m.streams]
    return model(pes, streams)


def test_declared_rename_is_one_pe_under_a_new_name() -> None:
    c = diff(BASE, renamed(BASE, "totals", "sums"))
    assert c.pes_renamed == (("totals", "sums"),)
    assert c.renames_inferred == ()
    assert c.pes_added == c.pes_removed == c.pes_changed == c.pes_rescaled == ()
    # its streams keep their identity (under the new name): nothing added or removed
    assert c.streams_added == c.streams_removed == c.streams_changed == ()
    assert c.regenerated == ()
    assert not c.is_empty
    assert c.describe() == ["> pe 'totals' renamed to 'sums'"]


def test_rename_with_a_code_change_and_a_rescale() -> None:
    c = diff(BASE, renamed(BASE, "totals", "sums", fingerprint="h", parallelism=3))
    assert c.pes_renamed == (("totals", "sums"),)
    assert c.pes_changed == ("sums",) and c.pes_rescaled == ("sums",)
    assert c.pes_added == c.pes_removed == c.regenerated == ()
    assert c.describe() == [
        "> pe 'totals' renamed to 'sums'",
        "~ pe 'sums' (code)",
        "↕ pe 'sums' 2 -> 3",
    ]


def test_rename_with_a_changed_input_stream() -> None:
    new = renamed(BASE, "totals", "sums")
    streams = [
        dataclasses.replace(s, key_fingerprint="k2") if s.dst == "sums" else s for s in new.streams
    ]
    c = diff(BASE, model(new.pes, streams))
    assert c.pes_renamed == (("totals", "sums"),)
    assert c.streams_changed == ("clean->sums",)
    assert c.regenerated == ()  # the renamed PE gets new instances anyway


def test_rename_is_inferred_from_code_kind_and_place() -> None:
    c = diff(BASE, renamed(BASE, "totals", "sums", declared=False))
    assert c.pes_renamed == (("totals", "sums"),)
    assert c.renames_inferred == ("sums",)
    assert c.pes_added == c.pes_removed == ()
    assert c.describe() == [
        "> pe 'totals' renamed to 'sums' (inferred: same code, config and place in the graph)"
    ]
    assert ChangeSet.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "why",
    ["code", "config", "stateless kind", "place", "two gone"],
)
def test_rename_is_not_inferred(why: str) -> None:
    old = BASE
    if why == "code":
        new = renamed(BASE, "totals", "sums", declared=False, fingerprint="h")
    elif why == "config":
        new = renamed(BASE, "totals", "sums", declared=False, config={"x": 1})
    elif why == "stateless kind":
        new = renamed(BASE, "clean", "tidy", declared=False)
    elif why == "place":  # fed straight from the source now, without 'clean'
        old = model(
            [*BASE.pes, pe("side", "sink")],
            [*BASE.streams, StreamSpec("clean", "side")],
        )
        new = model(
            [
                pe("raw", "source"),
                pe("clean"),
                pe("sums", "reduce", 2, keyed=True),
                pe("out", "sink"),
                pe("side", "sink"),
            ],
            [
                StreamSpec("raw", "clean"),
                StreamSpec("raw", "sums", "key", "k1"),
                StreamSpec("sums", "out"),
                StreamSpec("clean", "side"),
            ],
        )
    else:  # two PEs disappear: which one was renamed is not clear
        old = model(
            [*BASE.pes, pe("more", "reduce", keyed=True), pe("out2", "sink")],
            [*BASE.streams, StreamSpec("clean", "more", "key", "k1"), StreamSpec("more", "out2")],
        )
        new = model(
            [
                pe("raw", "source"),
                pe("clean"),
                pe("sums", "reduce", 2, keyed=True),
                pe("out", "sink"),
                pe("out2", "sink"),
            ],
            [
                StreamSpec("raw", "clean"),
                StreamSpec("clean", "sums", "key", "k1"),
                StreamSpec("sums", "out"),
                StreamSpec("clean", "out2"),
            ],
        )
    c = diff(old, new)
    assert c.pes_renamed == ()
    assert "sums" in c.pes_added or "tidy" in c.pes_added


def test_declared_rename_needs_the_old_name_in_the_running_version() -> None:
    # renamed_from naming a PE the old model lacks is a plain addition
    new = renamed(BASE, "totals", "sums", fingerprint="h")
    again = diff(new, new)  # the declaration stays in later versions: no change
    assert again.is_empty
    c = diff(renamed(BASE, "totals", "other", declared=False, fingerprint="z"), new)
    assert c.pes_renamed == ()
    assert c.pes_added == ("sums",) and c.pes_removed == ("other",)


def test_check_structure_refuses_bad_renames() -> None:
    dup = [
        dataclasses.replace(p, renamed_from="clean") if p.name == "totals" else p for p in BASE.pes
    ]
    problems = check_structure(LogicalModel.build("orders", dup, BASE.streams))
    assert problems == [
        "PE 'totals' of app 'orders': renamed_from 'clean' is the name of another PE of the app; "
        "a renamed PE's old name must be free"
    ]
    two = [
        dataclasses.replace(p, renamed_from="old") if p.name in ("clean", "totals") else p
        for p in BASE.pes
    ]
    problems = check_structure(LogicalModel.build("orders", two, BASE.streams))
    assert len(problems) == 1 and "claimed by PE" in problems[0]
    me = [
        dataclasses.replace(p, renamed_from="totals") if p.name == "totals" else p for p in BASE.pes
    ]
    assert (
        "names the PE itself" in check_structure(LogicalModel.build("orders", me, BASE.streams))[0]
    )


def test_a_cut_before_a_rename_restores_into_the_renamed_pe() -> None:
    new = renamed(BASE, "totals", "sums")
    cut = {"totals@1.0": [["k", 3]], "totals@1.1": None, "clean@1.0": None}
    assert renamed_states(cut, new) == {"sums@1.0": [["k", 3]], "sums@1.1": None, "clean@1.0": None}
    assert renamed_states(cut, BASE) is cut


def test_sdk_renamed_from_reaches_the_model() -> None:
    from hotwire import Topology
    from hotwire.sdk import ValidationError

    app = Topology("orders")
    src = app.source("raw", lambda ctx: iter(()))
    src.key_by(lambda r: r).reduce("sums", lambda a, r: r, renamed_from="totals").sink("out", print)
    assert app.model().pe("sums").renamed_from == "totals"
    bad = Topology("orders")
    bad.source("raw", lambda ctx: iter(())).map("m", str, renamed_from=3).sink("out", print)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=re.escape("renamed_from must be the PE's old name")):
        bad.model()
