"""The scheduler keeps a forward stream on one worker: instance i of a PE fed by a
forward stream goes where instance i of its upstream runs, whatever the PEs'
names, while other PEs spread as before."""

from __future__ import annotations

from hotwire.master.diff import diff
from hotwire.master.scheduler import schedule
from hotwire.model import LogicalModel, PESpec, StreamSpec, check_structure

APP = "chain"


def pe(name: str, kind: str = "map", par: int = 1) -> PESpec:
    return PESpec(name, kind, par, "f", f"fn_{name}")


def place(pes: list[PESpec], streams: list[StreamSpec], workers: dict[str, int]) -> dict:
    m = LogicalModel.build(APP, pes, streams)
    assert check_structure(m) == []
    pl = schedule(m, {}, diff(LogicalModel.build(APP, [], []), m), workers, 1, "b")
    return {name: p.workers for name, p in pl.items()}


def test_forward_chain_instances_share_a_worker() -> None:
    # Names sort against the chain: by name alone "a_ts" would be placed first.
    pes = [
        pe("z_src", "source", 3),
        pe("a_ts", par=3),
        pe("m_filter", "filter", 3),
        pe("b", "sink", 1),
    ]
    streams = [
        StreamSpec("z_src", "a_ts", "forward"),
        StreamSpec("a_ts", "m_filter", "forward"),
        StreamSpec("m_filter", "b", "shuffle"),
    ]
    got = place(pes, streams, {"w1": 8, "w2": 8, "w3": 8})
    assert got["a_ts"] == got["z_src"] == got["m_filter"], got
    assert len(set(got["z_src"])) == 3, f"the chain's instances spread over the workers: {got}"


def test_forward_falls_back_when_the_worker_is_full() -> None:
    pes = [pe("src", "source", 2), pe("ts", "sink", 2)]
    got = place(pes, [StreamSpec("src", "ts", "forward")], {"w1": 1, "w2": 3})
    assert sorted(got["src"] + got["ts"]) == ["w1", "w2", "w2", "w2"], got
    assert got["ts"][1] == got["src"][1], got


def test_without_forward_streams_instances_spread_by_load_and_name() -> None:
    pes = [pe("src", "source", 2), pe("ts", "sink", 2)]
    got = place(pes, [StreamSpec("src", "ts", "shuffle")], {"w1": 8, "w2": 8})
    assert got == {"src": ("w1", "w2"), "ts": ("w1", "w2")}, got
