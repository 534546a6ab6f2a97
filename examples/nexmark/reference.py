"""Plain-Python references of the Nexmark queries over the same events, and the
normal form both sides are compared in: each result a canonical JSON string
(sorted keys, floats rounded to 6 places, the ``version`` field dropped), the
results a sorted list (a multiset)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from nexmark import queries as Q
from nexmark.generator import MAX_AUCTION_MS, person_reach_ms


def _windows(t: int, size: int, slide: int) -> list[tuple[int, int]]:
    """The [start, end) windows of ``size`` every ``slide`` (aligned to 0) that hold ``t``."""
    last = t // slide * slide
    return [(s, s + size) for s in range(last, t - size, -slide)]


def q0(ev: list[dict[str, Any]]) -> list[Any]:
    return list(ev)


def q1(ev: list[dict[str, Any]]) -> list[Any]:
    return [Q.to_euro(e) for e in ev if e["kind"] == "bid"]


def q2(ev: list[dict[str, Any]]) -> list[Any]:
    return [Q.q2_project(e) for e in ev if e["kind"] == "bid" and Q.q2_selected(e)]


def q3(ev: list[dict[str, Any]]) -> list[Any]:
    persons = {e["id"]: e for e in ev if e["kind"] == "person" and e["state"] in Q.Q3_STATES}
    reach = person_reach_ms()
    out = []
    for a in ev:
        if a["kind"] == "auction" and a["category"] == Q.Q3_CATEGORY and a["seller"] in persons:
            p = persons[a["seller"]]
            assert a["date_time"] - reach <= p["date_time"] <= a["date_time"]
            out.append(Q.q3_seller(a, p))
    return out


def winning_bids(ev: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per auction with a valid bid, the highest (earliest of equal), in order of close."""
    auctions = {e["id"]: e for e in ev if e["kind"] == "auction"}
    best: dict[int, dict[str, Any]] = {}
    for b in ev:
        if b["kind"] != "bid":
            continue
        a = auctions[b["auction"]]
        assert a["date_time"] <= b["date_time"] <= a["date_time"] + MAX_AUCTION_MS
        w = Q.valid_bid(a, b)
        if w is not None:
            best[a["id"]] = Q.higher_bid(best.get(a["id"]), w)
    return sorted(best.values(), key=lambda w: w["expires"])


def q4(ev: list[dict[str, Any]]) -> list[Any]:
    size, slide = Q.Q4_WINDOW.size, Q.Q4_WINDOW.slide
    acc: dict[tuple[int, int, int], list[int]] = defaultdict(lambda: [0, 0])
    for w in winning_bids(ev):
        for s, e in _windows(w["expires"], int(size), int(slide)):
            a = acc[(w["category"], s, e)]
            a[0] += w["price"]
            a[1] += 1
    return [
        Q.q4_average({"key": k, "start": s, "end": e, "value": v}) for (k, s, e), v in acc.items()
    ]


def q5(ev: list[dict[str, Any]]) -> list[Any]:
    size, slide = int(Q.Q5_WINDOW.size), int(Q.Q5_WINDOW.slide)
    counts: dict[tuple[int, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for b in ev:
        if b["kind"] == "bid":
            for w in _windows(b["date_time"], size, slide):
                counts[w][b["auction"]] += 1
    out = []
    for (s, e), per in counts.items():
        top = max(per.values())
        out += [
            {"start": s, "end": e, "auction": a, "bids": top} for a, c in per.items() if c == top
        ]
    return out


def q6(ev: list[dict[str, Any]]) -> list[Any]:
    last: dict[int, list[int]] = {}
    out = []
    for w in winning_bids(ev):
        prices = last[w["seller"]] = [*last.get(w["seller"], []), w["price"]][-Q.Q6_LAST :]
        out.append(Q.q6_average([w["seller"], prices]))
    return out


def q7(ev: list[dict[str, Any]]) -> list[Any]:
    size = int(Q.Q7_WINDOW.size)
    best: dict[int, dict[str, Any]] = {}
    for b in ev:
        if b["kind"] == "bid":
            s = b["date_time"] // size * size
            best[s] = Q.highest(best.get(s), b)
    return [
        Q.q7_result({"start": s, "end": s + size, "value": b, "version": 0})
        for s, b in best.items()
    ]


def q8(ev: list[dict[str, Any]]) -> list[Any]:
    size = int(Q.Q8_WINDOW.size)
    persons: dict[tuple[int, int], dict[str, Any]] = {}
    for p in ev:
        if p["kind"] == "person":
            persons[(p["id"], p["date_time"] // size)] = p
    return [
        Q.q8_new_user(persons[(a["seller"], a["date_time"] // size)], a)
        for a in ev
        if a["kind"] == "auction" and (a["seller"], a["date_time"] // size) in persons
    ]


REFERENCES = {
    "q0": q0,
    "q1": q1,
    "q2": q2,
    "q3": q3,
    "q4": q4,
    "q5": q5,
    "q6": q6,
    "q7": q7,
    "q8": q8,
}


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items() if k != "version"}
    if isinstance(v, (list, tuple)):
        return [_round(x) for x in v]
    return v


def normalise(records: Iterable[Any]) -> list[str]:
    """The results as a sorted list of canonical JSON strings (a multiset)."""
    return sorted(json.dumps(_round(r), sort_keys=True) for r in records)


def reference(query: str, ev: list[dict[str, Any]]) -> list[str]:
    """The normalised expected results of ``query`` (or a variant of one) over ``ev``."""
    return normalise(REFERENCES[Q.VARIANTS.get(query, query)](ev))
