"""Nexmark queries Q0-Q8 as one hotwire app (any subset of them).

:func:`build` makes the app: a source of Nexmark events (the generator) with
``parallelism`` instances, instance ``i`` making part ``i`` of the events
(``events(..., part=i, parts=parallelism)``); behind each, on a forward stream,
its own timestamp assigner on ``date_time`` (a part's events come in order, so
no out-of-orderness; a PE downstream takes the least watermark of its inputs)
and filters for persons, auctions and bids; then each query's PEs and a sink
writing ``[wall time, result]`` JSON lines to ``<out_dir>/<query>.jsonl``. Event
time is in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from hotwire import Topology
from hotwire.sdk.windows import Sliding, Tumbling
from nexmark.generator import MAX_AUCTION_MS, STEP_MS, events, person_reach_ms

QUERIES = ["q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"]
# Q5 with another plan: every bid in one key's sliding windows, counted per auction
# in a dict (how Bytewax runs Q5, see bench/nexmark.py); the same results as q5.
VARIANTS = {"q5b": "q5"}
Q2_SKIP = 123  # Q2 keeps the bids of auctions whose id is a multiple of this
Q3_STATES = ("OR", "ID", "CA")
Q3_CATEGORY = 10
Q4_WINDOW = Sliding(10_000, 2_000)  # closed auctions per category: 10 s, every 2 s
Q5_WINDOW = Sliding(10_000, 2_000)  # bids per auction: 10 s, every 2 s
Q6_LAST = 10
Q7_WINDOW = Tumbling(10_000)
Q8_WINDOW = Tumbling(10_000)
TICK_MS = 1_000  # the source logs the wall time at which event time passes each multiple


# -- the source and the sinks ---------------------------------------------------
def event_source(n: int, rate: float | None = None, ticks: str | None = None) -> Any:
    """A source of the first ``n`` events: instance ``i`` of ``p`` yields part ``i`` of
    ``p``; ``rate`` events/s of wall time per instance (None: as fast as it can).
    With ``ticks`` (a file), each instance appends ``[ms, wall time]`` when its
    events first reach or pass each multiple of TICK_MS, and ``["end", wall time]``
    after its last event: a window ending at ``ms`` could first be known when every
    instance has logged ``ms`` (or its end). An instance resumes from its position
    at the same parallelism; another parallelism is refused."""

    def log(f: Any, ms: Any) -> None:
        if f is not None:
            f.write(json.dumps([ms, time.time()]) + "\n")

    def part(ctx: Any) -> Any:
        p = ctx.parallelism
        if any(s["of"] != p for s in ctx.predecessors):
            raise ValueError(
                f"the Nexmark source cannot resume at parallelism {p} from instances of "
                f"{sorted({s['of'] for s in ctx.predecessors})}: keep its parallelism"
            )
        return events(n, skip=ctx.position, part=ctx.instance, parts=p)

    def sync_source(ctx: Any) -> Any:
        f = open(ticks, "a", buffering=1) if ticks and not ctx.position else None
        next_tick = 0
        for e in part(ctx):
            if f is not None and e["date_time"] >= next_tick:
                top = e["date_time"] // TICK_MS * TICK_MS
                for ms in range(next_tick, top + 1, TICK_MS):
                    log(f, ms)
                next_tick = top + TICK_MS
            yield e
        log(f, "end")

    async def paced_source(ctx: Any) -> Any:
        t0 = time.monotonic()
        for i, e in enumerate(part(ctx)):
            if i % 100 == 0:
                ahead = t0 + i / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            yield e

    return sync_source if rate is None else paced_source


def result_sink(path: str) -> Any:
    """A sink appending ``[wall time, record]`` per record (one line, flushed)."""
    target = os.path.abspath(path)
    files: dict[str, Any] = {}

    def sink(record: Any) -> None:
        f = files.get(target)
        if f is None:
            f = files[target] = open(target, "a", buffering=1, encoding="utf-8")
        f.write(json.dumps([time.time(), record]) + "\n")

    return sink


# -- functions of the queries -----------------------------------------------------
def event_time(e: dict[str, Any]) -> int:
    return e["date_time"]


def is_person(e: dict[str, Any]) -> bool:
    return e["kind"] == "person"


def is_auction(e: dict[str, Any]) -> bool:
    return e["kind"] == "auction"


def is_bid(e: dict[str, Any]) -> bool:
    return e["kind"] == "bid"


def passthrough(e: dict[str, Any]) -> dict[str, Any]:
    return e


def to_euro(b: dict[str, Any]) -> dict[str, Any]:
    """Q1: the bid's price in euro (cents * 89 / 100, as Nexmark does)."""
    return {
        "auction": b["auction"],
        "bidder": b["bidder"],
        "price": b["price"] * 89 // 100,
        "date_time": b["date_time"],
    }


def q2_selected(b: dict[str, Any]) -> bool:
    return b["auction"] % Q2_SKIP == 0


def q2_project(b: dict[str, Any]) -> dict[str, Any]:
    return {"auction": b["auction"], "price": b["price"]}


def q3_seller(a: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    return {"name": p["name"], "city": p["city"], "state": p["state"], "auction": a["id"]}


def valid_bid(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """A bid that can win the auction: before it closes and at least its reserve."""
    if b["date_time"] < a["expires"] and b["price"] >= a["reserve"]:
        return {
            "auction": a["id"],
            "seller": a["seller"],
            "category": a["category"],
            "expires": a["expires"],
            "price": b["price"],
            "bid_time": b["date_time"],
        }
    return None


def higher_bid(acc: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The winning bid so far: the highest price, the earliest of equal ones."""
    if acc is None or (b["price"], -b["bid_time"]) > (acc["price"], -acc["bid_time"]):
        return b
    return acc


def closed_time(w: dict[str, Any]) -> int:
    """When an auction closed: its winning bid's ``expires``."""
    return w["value"]["expires"]


def sum_count(acc: list[int] | None, w: dict[str, Any]) -> list[int]:
    s, c = acc or (0, 0)
    return [s + w["value"]["price"], c + 1]


def q4_average(r: dict[str, Any]) -> dict[str, Any]:
    s, c = r["value"]
    return {"category": r["key"], "start": r["start"], "end": r["end"], "avg": s / c, "auctions": c}


def count_v1(acc: int | None, b: dict[str, Any]) -> int:
    return (acc or 0) + 1


def count_v2(acc: int | None, b: dict[str, Any]) -> int:
    """Counts as count_v1 does, written differently (the code an online upgrade swaps in)."""
    if acc is None:
        return 1
    return acc + 1


def window_end_ms(r: dict[str, Any]) -> int:
    """The event time of a window's result: the last millisecond of its window."""
    return r["end"] - 1


def hottest(key: Any, window: Any, counts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Q5: the auctions with the most bids in one sliding window (all of them on a tie)."""
    top = max(c["value"] for c in counts)
    version = max(c["version"] for c in counts)
    return [
        {"start": c["start"], "end": c["end"], "auction": c["key"], "bids": top, "version": version}
        for c in counts
        if c["value"] == top
    ]


def count_per_auction(acc: dict[int, int] | None, b: dict[str, Any]) -> dict[int, int]:
    """Q5b: bids per auction in one window of every bid."""
    if acc is None:
        acc = {}
    acc[b["auction"]] = acc.get(b["auction"], 0) + 1
    return acc


def hottest_of_all(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Q5b: the auctions with the most bids in one window's per-auction counts."""
    counted = [
        {"key": a, "start": r["start"], "end": r["end"], "value": c, "version": r["version"]}
        for a, c in r["value"].items()
    ]
    return hottest(None, None, counted)


def last_prices(acc: list[int] | None, w: dict[str, Any]) -> list[int]:
    """Q6: the selling prices of the seller's last Q6_LAST closed auctions."""
    return ((acc or []) + [w["value"]["price"]])[-Q6_LAST:]


def q6_average(kv: Any) -> dict[str, Any]:
    seller, prices = kv
    return {"seller": seller, "avg": sum(prices) / len(prices), "auctions": len(prices)}


def highest(acc: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Q7: the highest bid so far, the earliest of equal ones."""
    if acc is None or (b["price"], -b["date_time"]) > (acc["price"], -acc["date_time"]):
        return b
    return acc


def q7_result(r: dict[str, Any]) -> dict[str, Any]:
    b = r["value"]
    return {
        "start": r["start"],
        "end": r["end"],
        "auction": b["auction"],
        "bidder": b["bidder"],
        "price": b["price"],
        "date_time": b["date_time"],
        "version": r["version"],
    }


def q8_new_user(p: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    return {"id": p["id"], "name": p["name"], "reserve": a["reserve"]}


def all_bids(b: dict[str, Any]) -> int:
    return 0


# -- the app --------------------------------------------------------------------
def build(
    name: str,
    out_dir: str,
    n: int,
    queries: list[str] | None = None,
    rate: float | None = None,
    ticks: str | None = None,
    q5_count: Any = count_v1,
    q7_parallelism: int = 1,
    step_ms: int = STEP_MS,
    parallelism: int = 1,
) -> Topology:
    """The app running ``queries`` (default all) over the first ``n`` events.

    ``parallelism``: instances of the source, of each assigner and filter behind
    it (forward streams), of Q0-Q2's maps and sinks and of Q5's windows. Q7's
    window has one key (every bid), so ``q7_parallelism`` instances of which one
    holds it, as in Nexmark."""
    queries = list(queries or QUERIES)
    unknown = sorted(set(queries) - set(QUERIES) - set(VARIANTS))
    if unknown:
        raise ValueError(
            f"unknown Nexmark queries {unknown}; choose among {QUERIES + list(VARIANTS)}"
        )
    app = Topology(name)
    p = parallelism
    src = app.source("events", event_source(n, rate, ticks), parallelism=p)
    ev = src.forward().assign_timestamps("ts", event_time, parallelism=p).forward()
    need = set(queries)
    persons = ev.filter("persons", is_person, p) if need & {"q3", "q8"} else None
    auctions = ev.filter("auctions", is_auction, p) if need & {"q3", "q4", "q6", "q8"} else None
    bids = (
        ev.filter("bids", is_bid, p) if need & {"q1", "q2", "q4", "q5", "q5b", "q6", "q7"} else None
    )

    def out(q: str) -> Any:
        return result_sink(os.path.join(out_dir, f"{q}.jsonl"))

    if "q0" in need:
        ev.map("q0", passthrough, p).forward().sink("q0_out", out("q0"), p)
    if "q1" in need:
        bids.forward().map("q1", to_euro, p).forward().sink("q1_out", out("q1"), p)
    if "q2" in need:
        q2 = bids.forward().filter("q2", q2_selected, p)
        q2.forward().map("q2_project", q2_project, p).forward().sink("q2_out", out("q2"), p)
    if "q3" in need:
        # An interval join: a seller is a person at most person_reach_ms before the
        # auction, so both sides' buffers are dropped as the watermark passes.
        local = persons.filter("q3_persons", lambda p: p["state"] in Q3_STATES)
        cat = auctions.filter("q3_auctions", lambda a: a["category"] == Q3_CATEGORY)
        cat.key_by(lambda a: a["seller"]).interval_join(
            "q3", local.key_by(lambda p: p["id"]), -person_reach_ms(step_ms), 0, q3_seller
        ).sink("q3_out", out("q3"))
    if need & {"q4", "q6"}:
        # Winning bids: each valid bid meets its auction (bids come within the
        # auction's lifetime); a 1 ms window at the auction's close keeps the highest.
        pairs = auctions.key_by(lambda a: a["id"]).interval_join(
            "valid_bids", bids.key_by(lambda b: b["auction"]), 0, MAX_AUCTION_MS, valid_bid
        )
        winning = pairs.key_by(lambda w: w["auction"]).window(
            "winning", Tumbling(1), aggregate=higher_bid, timestamp=lambda w: w["expires"]
        )
        if "q4" in need:
            winning.key_by(lambda w: w["value"]["category"]).window(
                "q4", Q4_WINDOW, aggregate=sum_count, timestamp=closed_time
            ).map("q4_avg", q4_average).sink("q4_out", out("q4"))
        if "q6" in need:
            winning.key_by(lambda w: w["value"]["seller"]).reduce("q6", last_prices).map(
                "q6_avg", q6_average
            ).sink("q6_out", out("q6"))
    if "q5" in need:
        counts = bids.key_by(lambda b: b["auction"]).window(
            "q5_count", Q5_WINDOW, aggregate=q5_count, parallelism=p
        )
        counts.key_by(lambda c: c["start"]).window(
            "q5", Tumbling(Q5_WINDOW.slide), process=hottest, timestamp=window_end_ms, parallelism=p
        ).sink("q5_out", out("q5"))
    if "q5b" in need:
        bids.key_by(all_bids).window("q5b_count", Q5_WINDOW, aggregate=count_per_auction).flat_map(
            "q5b", hottest_of_all
        ).sink("q5b_out", out("q5b"))
    if "q7" in need:
        bids.key_by(all_bids).window(
            "q7", Q7_WINDOW, aggregate=highest, parallelism=q7_parallelism
        ).map("q7_result", q7_result).sink("q7_out", out("q7"))
    if "q8" in need:
        persons.key_by(lambda p: p["id"]).window_join(
            "q8", auctions.key_by(lambda a: a["seller"]), Q8_WINDOW, q8_new_user
        ).sink("q8_out", out("q8"))
    return app
