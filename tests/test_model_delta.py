"""model_delta / apply_delta: a version recorded as what changed rebuilds exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from hotwire.model import LogicalModel, PESpec, StreamSpec
from hotwire.model_delta import apply_delta, model_delta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from workload import wide_model

NAMES = [f"p{i}" for i in range(8)]


@st.composite
def models(draw: st.DrawFn) -> LogicalModel:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=8))
    pes = [
        PESpec(
            n,
            draw(st.sampled_from(["map", "reduce", "sink"])),
            draw(st.integers(1, 3)),
            draw(st.sampled_from(["fa", "fb"])),
            "f",
            draw(st.sampled_from([{}, {"v": 1}, {"v": [1, {"w": 2}]}])),
        )
        for n in names
    ]
    pairs = [(a, b) for a in names for b in names if a != b]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=12)) if pairs else []
    streams = [StreamSpec(a, b, draw(st.sampled_from(["shuffle", "key"]))) for a, b in edges]
    return LogicalModel.build(draw(st.sampled_from(["a", "b"])), pes, streams)


@settings(max_examples=300, deadline=None)
@given(models(), models())
def test_apply_delta_rebuilds_the_new_model_with_its_order(
    old: LogicalModel, new: LogicalModel
) -> None:
    delta = model_delta(old, new)
    assert delta is not None
    delta = json.loads(json.dumps(delta))  # what the store keeps
    back = apply_delta(old, delta)
    assert back.to_json() == new.to_json()
    assert list(back.graph) == list(new.graph)
    assert list(back.graph.edges) == list(new.graph.edges)


def test_one_changed_pe_among_a_thousand_is_one_pe_in_the_delta() -> None:
    old, new = wide_model(1000, version=0), wide_model(1000, version=1)
    delta = model_delta(old, new)
    assert delta is not None
    assert [p["name"] for p in delta["pes"]] == ["m0_0"]
    assert delta["pes_removed"] == delta["streams"] == delta["streams_removed"] == []
    assert "pe_order" not in delta and "stream_order" not in delta
    assert len(json.dumps(delta)) < len(new.to_json()) / 100
    assert apply_delta(old, delta) == new


def test_no_delta_for_a_stream_to_an_undeclared_pe() -> None:
    ok = LogicalModel.build("a", [PESpec("x", "source")], [])
    ghost = LogicalModel.build("a", [PESpec("x", "source")], [StreamSpec("x", "y")])
    assert model_delta(ok, ghost) is None
    assert model_delta(ghost, ok) is None
