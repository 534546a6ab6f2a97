"""A retiring source does not stall the switch that retires it: not when its
aclose() hangs, and not when its iterator swallows the cancellation."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

APP = """
import asyncio
from hotwire import Topology
from hotwire.testing import file_sink

N = 3000


class Numbers:
    def __init__(self, ctx):
        self.i = ctx.position

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.i >= N:
            await asyncio.sleep(3600)
{step}
        self.i += 1
        return {{"seq": self.i - 1, "v": {v}}}
{close}

app = Topology("retiring")
app.source("src", Numbers).sink("out", file_sink({out!r}))
"""

HANGS = (
    "        await asyncio.sleep(0.001)",
    "\n    async def aclose(self):\n"
    "        await asyncio.sleep(3600)  # never returns: a client that hangs on close\n",
)
SWALLOWS = (
    "        try:\n"
    "            await asyncio.sleep(0.001)\n"
    "        except asyncio.CancelledError:\n"
    "            pass  # swallowed, as asyncio.wait_for does on 3.11 when its result came with it",
    "",
)


@pytest.mark.parametrize(("step", "close"), [HANGS, SWALLOWS], ids=["aclose_hangs", "swallows"])
def test_a_retiring_source_still_retires(tmp_path: Path, step: str, close: str) -> None:
    out = tmp_path / "out.jsonl"
    v1 = write_app(tmp_path, "v1.py", APP.format(v=1, out=str(out), step=step, close=close))
    v2 = write_app(tmp_path, "v2.py", APP.format(v=2, out=str(out), step=step, close=close))
    # A switch that does not finish within 15 s restarts version 1 and is refused.
    with LocalCluster(data_dir=tmp_path / "c", switch_timeout=15.0) as c:
        c.client.submit(v1)
        poll_for(lambda: count_lines(out) >= 500, 30, what="records flowing")
        assert c.client.upgrade(v2).applied
        poll_for(lambda: count_lines(out) >= 3000, 60, what="every record")
        rows = read_jsonl(out)
        assert sorted(r["seq"] for r in rows) == list(range(3000)), "each record once"
        assert {r["v"] for r in rows} == {1, 2}
        logs = "".join(w.log_path.read_text() for w in c.workers)
    if close:
        assert "aclose() did not return" in logs, logs[-2000:]
