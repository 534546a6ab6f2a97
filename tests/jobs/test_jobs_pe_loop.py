"""The DL PE inside the worker's runtime: a slow batch does not block the event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from hotwire.jobs.pe import DLJobPE
from hotwire.pe.executors import ProcessExecutor
from hotwire.sdk.pe import Context

SLOW = """
import time
from hotwire.jobs import serve

def handle(r):
    time.sleep(0.2)
    return {"in": r}

serve(handle)
"""


def test_a_slow_batch_leaves_the_event_loop_free(state_dir: Path, tmp_path: Path) -> None:
    prog = tmp_path / "slow.py"
    prog.write_text(SLOW)
    ctx = Context(
        app="app1",
        pe="scorer",
        config={"request": {"framework": "generic", "program": str(prog)}},
    )
    errors: list[BaseException] = []

    async def main() -> tuple[list[object], float, int]:
        ex = ProcessExecutor(DLJobPE, ctx, lambda r, e: errors.append(e))
        await ex.setup()
        try:
            gaps: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.get_running_loop().create_task(ticker())
            await asyncio.sleep(0)  # the ticker starts its clock
            out = await ex.process(list(range(5)))  # ~1 s in the job
            stop.set()
            await tick
            return out, max(gaps, default=0.0), len(gaps)
        finally:
            await ex.teardown()

    out, worst, ticks = asyncio.run(main())
    assert not errors
    assert out == [{"in": i} for i in range(5)]
    assert ticks > 20 and worst < 0.3, f"the loop stalled for {worst:.2f}s ({ticks} ticks)"
