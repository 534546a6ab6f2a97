"""Draw the timelines of a ``bench/upgrade.py`` run as a PNG.

    python bench/plot.py FILE [--png OUT] [--scenarios a,b]

``FILE`` is the JSON written by ``bench/upgrade.py --out FILE`` (its timelines are
read from ``FILE.timeline.json`` beside it) or the timeline file itself. One row
per scenario: hotwire's online upgrades on the left, stop-and-resubmit on the
right; sink throughput (records/s, left axis) and per-record latency p50/p99
(ms, right axis, log scale) over time, with each upgrade marked (red: measured,
grey: the revert or the preceding upgrade). Needs matplotlib
(``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_timelines(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    if isinstance(doc, list):
        return doc
    side = path.with_suffix(".timeline.json")
    if not side.exists():
        raise SystemExit(f"plot: {side} not found; run bench/upgrade.py with --out {path}")
    result: list[dict[str, Any]] = json.loads(side.read_text())
    return result


def pair_up(
    timelines: list[dict[str, Any]],
) -> list[tuple[str, dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]]:
    """``(scenario, online, restart, bytewax timeline)`` in the order of the run."""
    rows: dict[str, list[dict[str, Any] | None]] = {}
    slots = {"restart": 1, "bytewax": 2}
    for t in timelines:
        name = t["name"]
        kind, _, rest = name.partition(":")
        key, i = (rest, slots[kind]) if kind in slots and rest else (name, 0)
        rows.setdefault(key, [None, None, None])[i] = t
    return [(k, v[0], v[1], v[2]) for k, v in rows.items()]


def draw(ax: Any, t: dict[str, Any] | None, title: str, ymax: float, latmax: float) -> Any:
    if t is None or not t["bins"]:
        ax.set_title(f"{title}: no data", fontsize=9)
        return None
    ts = [b[0] for b in t["bins"]]
    rps = [b[1] for b in t["bins"]]
    p50 = [b[2] for b in t["bins"]]
    p99 = [b[3] for b in t["bins"]]
    ax.step(ts, rps, where="post", color="tab:blue", lw=1, label="sink records/s")
    if len(t["bins"][0]) > 4:
        ax.step(
            ts,
            [b[4] for b in t["bins"]],
            where="post",
            color="tab:red",
            lw=1,
            label="of which duplicates/s",
        )
    ax.set_ylim(0, ymax * 1.15)
    ax.set_ylabel("records/s", fontsize=8)
    ax.set_xlabel("s", fontsize=8)
    ax.tick_params(labelsize=7)
    lat = ax.twinx()
    lat.plot(
        [x for x, y in zip(ts, p50, strict=False) if y is not None],
        [y for y in p50 if y is not None],
        color="tab:green",
        lw=0.8,
        label="latency p50",
    )
    lat.plot(
        [x for x, y in zip(ts, p99, strict=False) if y is not None],
        [y for y in p99 if y is not None],
        color="tab:orange",
        lw=0.8,
        label="latency p99",
    )
    lat.set_yscale("log")
    lat.set_ylim(0.5, latmax * 1.5)
    lat.set_ylabel("latency ms", fontsize=8)
    lat.tick_params(labelsize=7)
    for e in t["events"]:
        measured = e["kind"] in ("upgrade", "rollback", "restart")
        if e["kind"] == "upgrade" and any(x["kind"] == "rollback" for x in t["events"]):
            measured = False  # in the rollback scenario the rollback is measured
        ax.axvspan(
            e["t"],
            max(e["t_done"], e["t"] + 0.005),
            color="red" if measured else "grey",
            alpha=0.35 if measured else 0.2,
            lw=0,
        )
    ax.set_title(title, fontsize=9)
    return lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path, help="the JSON from bench/upgrade.py --out")
    ap.add_argument("--png", type=Path, default=None, help="output (default: FILE with .png)")
    ap.add_argument("--scenarios", default="", help="comma-separated subset to draw")
    a = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed; pip install matplotlib", file=sys.stderr)
        return 1
    rows = pair_up(load_timelines(a.file))
    if a.scenarios:
        keep = set(a.scenarios.split(","))
        rows = [r for r in rows if r[0] in keep]
    if not rows:
        print("plot: no timelines to draw", file=sys.stderr)
        return 1
    ymax = max((b[1] for r in rows for t in r[1:] if t for b in t["bins"]), default=1.0)
    latmax = max(
        (b[3] for r in rows for t in r[1:] if t for b in t["bins"] if b[3] is not None),
        default=10.0,
    )
    cols = 3 if any(r[3] for r in rows) else 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(6 * cols, 2.4 * len(rows)), squeeze=False)
    twins = []
    for i, (name, online, restart, peer) in enumerate(rows):
        twins.append(draw(axes[i][0], online, f"{name}: hotwire online upgrade", ymax, latmax))
        twins.append(draw(axes[i][1], restart, f"{name}: stop and resubmit", ymax, latmax))
        if cols == 3:
            title = f"{name}: bytewax kill + resume from recovery"
            twins.append(draw(axes[i][2], peer, title, ymax, latmax))
    handles: list[Any] = []
    labels: list[str] = []
    for ax in (axes[0][1], twins[1]):
        if ax is not None:
            h, lbl = ax.get_legend_handles_labels()
            handles += h
            labels += lbl
    fig.legend(handles, labels, loc="upper center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = a.png or a.file.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
