"""Upgrade scenarios: pairs of app versions for every kind of change, and their checks.

Each app counts records per key in a keyed class PE (state), writes every result
to a JSON-lines sink, and is fed by a paced :func:`hotwire.testing.counter`
source. The same scenarios drive the integration tests and ``bench/upgrade.py``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["SCENARIOS", "Shape", "Verdict", "check_output", "render"]


@dataclass(frozen=True)
class Shape:
    """The knobs one app version is built from."""

    enrich_p: int = 2
    enrich_cfg: tuple[tuple[str, Any], ...] = ()
    extra: bool = False  # a map "extra" between enrich and count
    count_p: int = 2
    count_code: int = 1
    audit_from: str = ""  # "", "src", "enrich" or "count": a second sink "audit"
    src_variant: int = 1
    sink_variant: int = 1
    key_variant: int = 1  # key function of the src -> enrich stream
    enrich_partition: str = "key"  # "key" or "forward"-free alternatives
    shadow: bool = False  # a second source "shadow" -> "shadow_out" untouched by upgrades


BASE = Shape()

# name -> (v1, v2)
SCENARIOS: dict[str, tuple[Shape, Shape]] = {
    "insert_pe": (BASE, replace(BASE, extra=True)),
    "remove_pe": (replace(BASE, extra=True), BASE),
    "change_code": (BASE, replace(BASE, count_code=2)),
    "change_config": (BASE, replace(BASE, enrich_cfg=(("factor", 2),))),
    "rescale_stateless": (BASE, replace(BASE, enrich_p=3)),
    "rescale_keyed": (BASE, replace(BASE, count_p=3)),
    "change_partitioning": (BASE, replace(BASE, key_variant=2)),
    "add_branch": (BASE, replace(BASE, audit_from="count")),
    "remove_branch": (replace(BASE, audit_from="count"), BASE),
    "reroute": (replace(BASE, audit_from="src"), replace(BASE, audit_from="enrich")),
    "replace_source": (BASE, replace(BASE, src_variant=2)),
    "replace_sink": (BASE, replace(BASE, sink_variant=2)),
}


def render(
    shape: Shape,
    *,
    out: str,
    audit: str,
    n: int | None,
    rate: float | None,
    keys: int = 64,
    name: str = "upg",
    shadow_out: str = "",
    prelude: str | None = None,
    source: str | None = None,
    carry: tuple[str, ...] = (),
) -> str:
    """The app file for one version.

    By default the app uses :func:`hotwire.testing.counter` and JSON-lines sinks.
    A benchmark passes its own ``prelude`` (imports, a source, and ``write`` and
    ``audit`` sink functions), the ``source`` expression, and record fields the
    counting PE must ``carry`` through (e.g. an emit timestamp).
    """
    pad = ", payload=8" if shape.src_variant == 2 else ""
    keyfn = 'lambda r: r["key"]' if shape.key_variant == 1 else 'lambda r: "p" + r["key"]'
    if prelude is None:
        written = "OUT(r)" if shape.sink_variant == 1 else 'OUT({**r, "sink": 2})'
        prelude = "\n".join(
            [
                "from hotwire import Topology",
                "from hotwire.sdk import ProcessPE",
                "from hotwire.testing import counter, file_sink",
                "",
                f"OUT = file_sink({out!r})",
                f"AUDIT = file_sink({audit!r})",
                "",
                "",
                "def write(r):",
                f"    {written}",
                "",
                "",
                "def audit(r):",
                '    AUDIT({"seq": r["seq"], "key": r["key"]})',
                "",
            ]
        )
    if source is None:
        source = f"counter(n={n!r}, rate={rate!r}, keys={keys}{pad})"
    extra_fields = "".join(f", {f!r}: r[{f!r}]" for f in carry)
    lines = [
        prelude,
        "",
        "class Count(ProcessPE):",
        "    def setup(self, ctx):",
        "        self.n = {}",
        "",
        "    def process(self, r):",
        '        k = r["key"]',
        "        n = self.n.get(k, 0) + 1",
        "        self.n[k] = n",
        f'        yield {{"seq": r["seq"], "key": k, "n": n, "code": {shape.count_code}'
        f"{extra_fields}}}",
        "",
        "    def snapshot(self):",
        "        return self.n",
        "",
        "    def restore(self, state):",
        "        self.n.update(state)",
        "",
        "    def merge(self, state):",
        "        self.n.update(state)",
        "",
        "",
        f"app = Topology({name!r})",
        f'src = app.source("src", {source})',
        f'enrich = src.key_by({keyfn}).map("enrich", lambda r: r, '
        f"parallelism={shape.enrich_p}, config={dict(shape.enrich_cfg)!r})",
    ]
    feed = "enrich"
    if shape.extra:
        lines.append(
            'extra = enrich.key_by(lambda r: r["key"]).map("extra", '
            'lambda r: {**r, "extra": 1}, parallelism=2)'
        )
        feed = "extra"
    lines += [
        f'count = {feed}.key_by(lambda r: r["key"]).process("count", Count, '
        f"parallelism={shape.count_p})",
        'count.sink("out", write)',
    ]
    if shape.audit_from:
        lines.append(f'{shape.audit_from}.sink("audit", audit)')
    if shape.shadow and shadow_out:
        lines += [
            f"SHADOW = file_sink({shadow_out!r})",
            f'app.source("shadow", counter(n={n!r}, rate={rate!r}, keys=4))'
            '.sink("shadow_out", SHADOW)',
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Verdict:
    """What a run's sink output says about exactly-once, order and state."""

    received: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    state_resets: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.out_of_order or self.state_resets)


def check_output(rows: list[dict[str, Any]], n: int) -> Verdict:
    """Count lost and duplicated sequence numbers, per-key order and state resets."""
    v = Verdict(received=len(rows))
    seen: dict[int, int] = defaultdict(int)
    last_seq: dict[str, int] = {}
    last_n: dict[str, int] = {}
    reset_keys: set[str] = set()
    for r in rows:
        seq, key = r["seq"], r["key"]
        seen[seq] += 1
        if key in last_seq and seq < last_seq[key]:
            v.out_of_order += 1
        last_seq[key] = max(seq, last_seq.get(key, -1))
        if "n" in r:
            expect = last_n.get(key, 0) + 1
            if r["n"] != expect and seen[seq] == 1:
                if r["n"] == 1:
                    reset_keys.add(key)
                elif len(v.problems) < 5:
                    v.problems.append(f"key {key}: count {r['n']} after {expect - 1}")
            last_n[key] = r["n"]
    v.duplicated = sum(c - 1 for c in seen.values() if c > 1)
    v.lost = sum(1 for s in range(n) if s not in seen)
    v.state_resets = len(reset_keys)
    return v


def read_exact(
    out: str | Path, n: int, timeout: float = 60.0, context: Any = None
) -> list[dict[str, Any]]:
    """Wait for ``n`` lines at the JSON-lines sink ``out`` and return its rows, after
    asserting that none was lost, duplicated, out of order or counted from a reset
    state (``context`` goes into the assertion message)."""
    from hotwire.testing.cluster import poll_for
    from hotwire.testing.sources import count_lines, read_jsonl

    poll_for(lambda: count_lines(out) >= n, timeout, what="every record at the sink")
    rows = read_jsonl(out)
    v = check_output(rows, n)
    assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), (v, context)
    assert not v.problems, (v.problems, context)
    return rows
