"""A small PyTorch model (CPU) scoring records in a stream.

``streamctl up examples/dl/scoring_app.py``: readings flow from a source into a
``dl_job`` PE, whose job (``score_model.py``, started by the ``local`` backend
with the ``pytorch-single`` template and the ``pytorch-2.13-cpu`` image) scores
them in batches; the scores come back as a stream and are printed.

Changing the request (say ``"image": "..."`` or ``"template": "..."``) and running
``streamctl upgrade`` starts the new job, switches the stream, then stops the old one.
"""

import asyncio
import math
from pathlib import Path

from hotwire import Topology

HERE = Path(__file__).resolve().parent


async def readings(ctx):
    """One reading every 50 ms, resuming where an earlier generation stopped."""
    i = ctx.position
    while True:
        yield {"id": i, "features": [math.sin(i / 10), math.cos(i / 7), (i % 13) / 13, 1.0]}
        i += 1
        await asyncio.sleep(0.05)


def show(record):
    print(f"{record['id']} {record['score']:.4f}", flush=True)


app = Topology("scoring")
scores = app.source("readings", readings).dl_job(
    "scorer",
    request={
        "framework": "pytorch",
        "version": "2.13",
        "mode": "single",
        "program": str(HERE / "score_model.py"),
        "resources": {"cpu": 1, "memory": "2Gi"},
    },
    parallelism=1,
)
scores.sink("print", show)
