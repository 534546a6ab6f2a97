"""Rescaling a partitioned source keeps every partition's position: the new
instances merge the old instances' position logs at the handed-over counts, so
nothing is read twice and nothing is skipped (FileSource; online on a cluster)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from hotwire.connectors.files import FileSource, read_committed
from hotwire.master.cut import states_for_restart
from hotwire.sdk.pe import Context
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

FILES = 6
PER_FILE = 1500


def _ctx(instance: int, parallelism: int, position: int = 0, preds: Any = ()) -> Context:
    """The context a worker gives source instance ``instance`` of ``parallelism``."""
    return Context(
        "a", "src", instance, parallelism, position=position, predecessors=[dict(p) for p in preds]
    )


async def _take(source: FileSource, ctx: Any, n: int) -> list[Any]:
    """Up to ``n`` records, stopping after 0.3 s without one."""
    out: list[Any] = []
    gen = source(ctx).__aiter__()
    try:
        while len(out) < n:
            try:
                out.append(await asyncio.wait_for(gen.__anext__(), 0.3))
            except TimeoutError:
                break
    finally:
        await gen.aclose()
    return out


def _files(d: Path, per_file: int) -> set[tuple[int, int]]:
    d.mkdir(exist_ok=True)
    for f in range(FILES):
        (d / f"f{f}.jsonl").write_text(
            "".join(json.dumps({"f": f, "i": i}) + "\n" for i in range(per_file))
        )
    return {(f, i) for f in range(FILES) for i in range(per_file)}


def _keys(records: list[Any]) -> list[tuple[int, int]]:
    return [(r["f"], r["i"]) for r in records]


def test_one_to_two_to_one_reads_each_line_once_even_when_cut_inside_a_batch(
    tmp_path: Path,
) -> None:
    want = _files(tmp_path / "in", 10)
    src = FileSource(tmp_path / "in", batch=4, poll_interval=0.01)
    first = asyncio.run(_take(src, _ctx(0, 1), 7))  # 7: inside the second batch
    preds = [{"instance": 0, "of": 1, "position": 7}]
    # 1 -> 2: instance 0 keeps the old count (0 % 2 == 0), instance 1 starts at 0.
    a = asyncio.run(_take(src, _ctx(0, 2, 7, preds), 9))
    b = asyncio.run(_take(src, _ctx(1, 2, 0, preds), 11))
    assert a and b, "both new instances read"
    # 2 -> 1: the one instance merges both logs at their counts.
    preds2 = [
        {"instance": 0, "of": 2, "position": 7 + len(a)},
        {"instance": 1, "of": 2, "position": len(b)},
    ]
    rest = asyncio.run(_take(src, _ctx(0, 1, 7 + len(a), preds2), 100))
    seen = Counter(_keys(first + a + b + rest))
    assert set(seen) == want, sorted(want - set(seen))
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]


def test_a_rescaled_instance_restarted_at_zero_keeps_its_merged_positions(
    tmp_path: Path,
) -> None:
    _files(tmp_path / "in", 10)
    src = FileSource(tmp_path / "in", batch=5, poll_interval=0.01)
    first = asyncio.run(_take(src, _ctx(0, 1), 23))  # of 60: inside a batch
    preds = [{"instance": 0, "of": 1, "position": len(first)}]
    # Instance 1 of 2 starts from the merged positions; a checkpoint covers none of
    # its records (count 0) when it fails after emitting one.
    (one,) = asyncio.run(_take(src, _ctx(1, 2, 0, preds), 1))
    # The restart from that checkpoint: count 0 at the same parallelism.
    again = asyncio.run(_take(src, _ctx(1, 2, 0, [{"instance": 1, "of": 2, "position": 0}]), 100))
    assert not set(_keys(again)) & set(_keys(first)), "read again what the old instance read"
    assert _keys(again)[0] == _keys([one])[0], "the record after the checkpoint comes again"
    # A fresh start (no state restored) ignores the log and reads its files from 0.
    fresh = asyncio.run(_take(src, _ctx(1, 2), 100))
    assert {i for _f, i in _keys(fresh)} >= {0}


def test_a_restart_after_a_rescale_gives_every_new_source_instance_every_old_position() -> None:
    cut = {
        "src@1.0": {"position": 40, "instance": 0, "of": 1},
        "count@1.0": {"n": 3},
    }
    out = states_for_restart(cut, {"src": 2, "count": 1}, {"src": False, "count": False})
    assert out[("src", 0)] == out[("src", 1)] == [cut["src@1.0"]]
    assert out[("count", 0)] == [{"n": 3}]
    # A checkpoint of the old form (no instance/of) maps as before: j % n.
    old = {"src@1.0": {"position": 40}}
    out = states_for_restart(old, {"src": 2}, {"src": False})
    assert out == {("src", 0): [{"position": 40}]}


def _app(tmp_path: Path, name: str, src_dir: Path, out: Path, parallelism: int) -> str:
    return write_app(
        tmp_path,
        f"{name}.py",
        f"""
        from hotwire import Topology
        from hotwire.connectors.files import FileSource, JsonlSink

        app = Topology("rescale")
        src = app.source("src", FileSource({str(src_dir)!r}, poll_interval=0.02, batch=100),
                         parallelism={parallelism})
        src.sink("out", JsonlSink, config={{"dir": {str(out)!r}}})
        """,
    )


def _writer(d: Path, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        files = [open(d / f"part-{f}.jsonl", "a") for f in range(FILES)]
        for i in range(PER_FILE):
            for f, fh in enumerate(files):
                fh.write(json.dumps({"f": f, "i": i}) + "\n")
                fh.flush()
            if i % 50 == 49:
                stop.wait(0.05)
        for fh in files:
            fh.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_online_rescales_of_the_source_one_to_two_and_back_keep_every_line_once(
    tmp_path: Path,
) -> None:
    src_dir, out = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    committed = lambda: read_committed(out) if out.exists() else []  # noqa: E731
    total = FILES * PER_FILE
    stop = threading.Event()
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(_app(tmp_path, "p1", src_dir, out, 1))
        writer = _writer(src_dir, stop)
        try:
            poll_for(lambda: len(committed()) > total // 5, 30, what="commits")
            assert c.client.upgrade(_app(tmp_path, "p2", src_dir, out, 2)).applied
            src = next(p for p in c.client.status("rescale").apps[0].pes if p.name == "src")
            assert len(src.instances) == 2
            poll_for(lambda: len(committed()) > total // 2, 30, what="commits at 2")
            assert c.client.upgrade(_app(tmp_path, "p3", src_dir, out, 1)).applied
            src = next(p for p in c.client.status("rescale").apps[0].pes if p.name == "src")
            assert len(src.instances) == 1
        finally:
            stop.set()
            writer.join(60)
        # A line read twice would be read again where its instance started, before
        # the last lines written: by now it is committed too.
        poll_for(lambda: len(committed()) >= total, 60, what="every line")
    seen = Counter((r["f"], r["i"]) for r in committed())
    want = {(f, i) for f in range(FILES) for i in range(PER_FILE)}
    assert set(seen) == want, sorted(want - set(seen))[:10]
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:10]
