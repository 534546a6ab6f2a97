"""The benchmark's apps: timestamped versions of the upgrade scenarios, and wide topologies.

``render_app`` writes the same topology as :func:`hotwire.testing.scenarios.render`
(src -> enrich -> [extra ->] count -> out, optional audit sink) but self-contained:
the source stamps each record with its emit time ``t`` and paces itself in 1 ms
ticks, and the sink appends ``{"seq", "key", "n", "code", "t_emit", "t_sink"}``
lines. Everything is defined in the app file itself, so a worker needs nothing
beyond the bundle; source and sink code is identical in every version, so an
upgrade never touches them.

``render_wide`` and ``wide_model`` build topologies of an exact number of PEs
(chains of maps, each ending in a sink, fed by two sources) for the scaling
measurements.
"""

from __future__ import annotations

from typing import Any

from hotwire.model import LogicalModel, PESpec, StreamSpec
from hotwire.testing.scenarios import Shape, render

_APP_HEAD = '''\
import asyncio
import json
import os
import threading
import time

from hotwire import Topology
from hotwire.sdk import ProcessPE

N = {n!r}
RATE = {rate!r}
KEYS = {keys!r}
TICK_S = 0.001  # the source paces itself in ticks this long


async def stamped(ctx):
    start = int(getattr(ctx, "position", 0) or 0)
    step = max(1, int(RATE * TICK_S)) if RATE else 256
    t0 = time.monotonic()
    seq = start
    while N is None or seq < N:
        yield {{"seq": seq, "key": "k%d" % (seq % KEYS), "t": time.time()}}
        seq += 1
        if (seq - start) % step == 0:
            if RATE:
                ahead = (seq - start) / RATE - (time.monotonic() - t0)
                await asyncio.sleep(ahead if ahead > 0 else 0)
            else:
                await asyncio.sleep(0)


class Lines:
    """Appends whole JSON lines with one O_APPEND write per flush (safe across versions)."""

    def __init__(self, path):
        self.path = path
        self.buf = []
        self.lock = threading.Lock()
        self.fd = None

    def __call__(self, obj):
        with self.lock:
            self.buf.append(json.dumps(obj))
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                threading.Thread(target=self._flusher, daemon=True).start()
            if len(self.buf) >= 2048:
                self._flush()

    def _flush(self):
        if self.buf:
            os.write(self.fd, ("\\n".join(self.buf) + "\\n").encode())
            self.buf = []

    def _flusher(self):
        while True:
            time.sleep(0.02)
            with self.lock:
                self._flush()


OUT = Lines({out!r})
AUDIT = Lines({audit!r})


def write(r):
    OUT({{"seq": r["seq"], "key": r["key"], "n": r["n"], "code": r["code"],
         "t_emit": r["t"], "t_sink": time.time()}})


def audit(r):
    AUDIT({{"seq": r["seq"], "key": r["key"]}})


'''


def render_app(
    shape: Shape, *, out: str, audit: str, n: int | None, rate: float | None, keys: int, name: str
) -> str:
    """The app file of one version of a scenario, with emit and sink timestamps."""
    if shape.key_variant != 1 or shape.src_variant != 1 or shape.sink_variant != 1:
        raise ValueError("bench apps support changes of enrich, extra, count and audit only")
    prelude = _APP_HEAD.format(n=n, rate=rate, keys=keys, out=out, audit=audit)
    return render(
        shape,
        out=out,
        audit=audit,
        n=n,
        rate=rate,
        keys=keys,
        name=name,
        prelude=prelude,
        source="stamped",
        carry=("t",),
    )


def chain_lengths(pes: int) -> list[int]:
    """PEs per chain (maps + its sink) so that 2 sources + the chains make exactly ``pes``."""
    if pes < 6:
        raise ValueError("a wide topology needs at least 6 PEs")
    rest = pes - 2
    chains = max(2, round(rest**0.5))
    return [rest // chains + (1 if c < rest % chains else 0) for c in range(chains)]


def render_wide(pes: int, *, name: str, rate: float, version: int = 0) -> str:
    """An app of exactly ``pes`` PEs; ``version`` goes into the config of ``m0_0`` only.

    Source ``src`` emits ``rate`` records/s into chain 0, where the changed PE is, so
    its switch finds a batch boundary soon; source ``bg`` feeds every other chain at
    1 record/s, so that a large topology is alive without saturating the machine.
    """
    lines = [
        "import asyncio",
        "",
        "from hotwire import Topology",
        "",
        "",
        "def ticker(rate):",
        "    async def tick(ctx):",
        "        seq = int(getattr(ctx, 'position', 0) or 0)",
        "        while True:",
        "            yield {'seq': seq}",
        "            seq += 1",
        "            await asyncio.sleep(1 / rate)",
        "",
        "    return tick",
        "",
        "",
        "def same(r):",
        "    return r",
        "",
        "",
        "def drop(r):",
        "    return None",
        "",
        "",
        f"app = Topology({name!r})",
        f'src = app.source("src", ticker({rate!r}))',
    ]
    lengths = chain_lengths(pes)
    lines.append('bg = app.source("bg", ticker(1.0))')
    for c, length in enumerate(lengths):
        lines.append("s = src" if c == 0 else "s = bg")
        for i in range(length - 1):
            cfg = f", config={{'v': {version}}}" if (c, i) == (0, 0) else ""
            lines.append(f's = s.map("m{c}_{i}", same{cfg})')
        lines.append(f's.sink("out{c}", drop)')
    return "\n".join(lines) + "\n"


def wide_model(pes: int, *, name: str = "wide", version: int = 0) -> LogicalModel:
    """The shape of :func:`render_wide` as a logical model built directly (no user code)."""
    lengths = chain_lengths(pes)
    specs = [
        PESpec("src", "source", 1, "fp-src", "tick"),
        PESpec("bg", "source", 1, "fp-bg", "tick"),
    ]
    streams: list[StreamSpec] = []
    for c, length in enumerate(lengths):
        prev = "src" if c == 0 else "bg"
        for i in range(length - 1):
            pe = f"m{c}_{i}"
            cfg: dict[str, Any] = {"v": version} if (c, i) == (0, 0) else {}
            fp = f"fp-map-{version}" if (c, i) == (0, 0) else "fp-map"
            specs.append(PESpec(pe, "map", 1, fp, "same", cfg))
            streams.append(StreamSpec(prev, pe))
            prev = pe
        specs.append(PESpec(f"out{c}", "sink", 1, "fp-sink", "drop"))
        streams.append(StreamSpec(prev, f"out{c}"))
    return LogicalModel.build(name, specs, streams)
