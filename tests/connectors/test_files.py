"""The file source: byte offsets per file, kept across restarts and online upgrades."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hotwire.connectors.files import FileSource, read_committed
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

FILES = 4
PER_FILE = 1500


def _ctx(position: int = 0, instance: int = 0, parallelism: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        app="a", pe="src", instance=instance, parallelism=parallelism, position=position
    )


async def _take(source: FileSource, ctx: Any, n: int) -> list[Any]:
    out: list[Any] = []
    gen = source(ctx)
    try:
        async for r in gen:
            out.append(r)
            if len(out) == n:
                break
    finally:
        await gen.aclose()
    return out


def test_a_restart_resumes_each_file_at_its_offset_even_inside_a_batch(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for f in range(3):
        (d / f"f{f}.jsonl").write_text(
            "".join(json.dumps({"f": f, "i": i}) + "\n" for i in range(10))
        )
    with open(d / "f1.jsonl", "a") as f:
        f.write('{"f": 1, "i": "partial"')  # no newline: not read yet
    src = FileSource(d, batch=4, poll_interval=0.01)
    first = asyncio.run(_take(src, _ctx(), 7))  # 7 records: inside the second batch
    # The checkpoint says 7 records were emitted: a new generation goes on from there.
    rest = asyncio.run(_take(src, _ctx(position=7), 23))
    seen = [(r["f"], r["i"]) for r in first + rest]
    assert len(seen) == 30 and len(set(seen)) == 30, seen
    with open(d / "f1.jsonl", "a") as f:
        f.write("}\n")
    # A third generation resumes at 30 and reads the line completed meanwhile.
    assert asyncio.run(_take(src, _ctx(position=30), 1)) == [{"f": 1, "i": "partial"}]


def test_a_rescaled_source_without_its_log_refuses_to_guess(tmp_path: Path) -> None:
    src = FileSource(tmp_path, poll_interval=0.01)
    with pytest.raises(RuntimeError, match="resumes at record 5 but its position log"):
        asyncio.run(_take(src, _ctx(position=5, parallelism=2), 1))


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"patern": "*.jsonl"}, "FileSource: unknown option(s) 'patern'; known: pattern"),
        ({"format": "csv"}, "FileSource: format 'csv' is not 'jsonl' or 'lines'"),
        ({"batch": 0}, "FileSource: batch must be a positive number, got 0"),
    ],
)
def test_bad_options_are_refused_by_the_constructor(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        FileSource("/data", **kwargs)


def _app(tmp_path: Path, name: str, src_dir: Path, out: Path, v: int, extra: str = "") -> str:
    return write_app(
        tmp_path,
        f"{name}.py",
        f"""
        from hotwire import Topology
        from hotwire.connectors.files import FileSource, JsonlSink

        app = Topology("tail")
        src = app.source("src", FileSource({str(src_dir)!r}, poll_interval=0.05{extra}), parallelism=2)
        m = src.map("tag", lambda r: {{**r, "v": {v}}})
        m.sink("out", JsonlSink, config={{"dir": {str(out)!r}}})
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


def test_an_upgrade_that_replaces_the_source_keeps_its_offsets(tmp_path: Path) -> None:
    src_dir, out = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    v1 = _app(tmp_path, "v1", src_dir, out, 1)
    v2 = _app(tmp_path, "v2", src_dir, out, 2, extra=", batch=200")
    committed = lambda: read_committed(out) if out.exists() else []  # noqa: E731
    stop = threading.Event()
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(v1)
        writer = _writer(src_dir, stop)
        poll_for(lambda: len(committed()) > FILES * PER_FILE // 4, 30, what="commits")
        assert c.client.upgrade(v2).applied
        pes = {p.name: p.gen for p in c.client.status("tail").apps[0].pes}
        assert pes["src"] == 2, "the source PE was replaced"
        writer.join(60)
        poll_for(lambda: len(committed()) >= FILES * PER_FILE, 60, what="every line")
    rows = committed()
    seen = Counter((r["f"], r["i"]) for r in rows)
    assert set(seen) == {(f, i) for f in range(FILES) for i in range(PER_FILE)}
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:10]
    assert {r["v"] for r in rows} == {1, 2}


def test_a_bad_option_fails_submit_in_one_line(tmp_path: Path) -> None:
    src_dir, out = tmp_path / "in", tmp_path / "out"
    bad = _app(tmp_path, "bad", src_dir, out, 1, extra=", patern='*.txt'")
    with LocalCluster(data_dir=tmp_path / "cluster") as c:
        res = c.streamctl("submit", bad)
        assert res.returncode != 0
        assert "FileSource: unknown option(s) 'patern'" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not c.client.status().apps
