"""The logical model's serialisation: field by field, what dataclasses.asdict gives."""

from __future__ import annotations

from dataclasses import asdict, fields

from hotwire.model import LogicalModel, PESpec, StreamSpec


def test_pe_and_stream_to_dict_carry_every_field_like_asdict() -> None:
    pe = PESpec("count", "reduce", 3, "fp-1", "count", {"w": {"n": [1, 2]}}, True, "old")
    st = StreamSpec("src", "count", "key", "fp-key")
    assert pe.to_dict() == asdict(pe)
    assert list(pe.to_dict()) == [f.name for f in fields(PESpec)]
    assert st.to_dict() == asdict(st)
    assert list(st.to_dict()) == [f.name for f in fields(StreamSpec)]
    assert PESpec.from_dict(pe.to_dict()) == pe
    assert StreamSpec.from_dict(st.to_dict()) == st


def test_to_dict_copies_the_config() -> None:
    pe = PESpec("m", "map", config={"w": {"n": [1]}})
    d = pe.to_dict()
    d["config"]["w"]["n"].append(2)
    assert pe.config == {"w": {"n": [1]}}


def test_model_round_trips_through_json() -> None:
    m = LogicalModel.build(
        "app",
        [PESpec("src", "source", 1, "a", "s"), PESpec("out", "sink", 2, "b", "o", {"k": 1})],
        [StreamSpec("src", "out", "broadcast")],
    )
    back = LogicalModel.from_json(m.to_json())
    assert back == m
    assert back.pes == m.pes and back.streams == m.streams
