"""Event time: watermark markers, an instance's input watermark, and keyed windows.

A **watermark** ``t`` on a channel says that no more records with a timestamp
below ``t`` are expected on it. Timestamp assigners make them (from the largest
timestamp seen minus the allowed out-of-orderness); they travel in-band, each as
a batch of one marker (:func:`marker`), so they stay in order with the records
and pass through checkpoint alignment, gates and epochs like any batch. Every
instance keeps the watermark of each input channel (:class:`InputWatermarks`)
and its own is the minimum over the inputs that are not idle; it never goes
down. A source whose iterator ends sends the final watermark, ``+inf``.

:class:`KeyedWindows` holds the open windows of a keyed windowed PE and fires
them as the watermark passes their end. Its snapshot is keyed state
(``{key: windows}``), so windows move by key on a rescale, and it carries the
watermark under :data:`REPLICATED_KEY`, an entry that every part of a split
receives (``hotwire.pe.state.split_pairs``).

Pure: no asyncio, sockets, clocks (callers pass ``now``) or I/O.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from msgpack import ExtType

from hotwire.codec import hashable_key
from hotwire.pe.state import REPLICATED_KEY

WATERMARK_CODE = 72  # the msgpack ext type of a watermark marker
_MARK = struct.Struct(">dd")
INF = math.inf
NEG_INF = -math.inf
NAN = math.nan  # equal to nothing

__all__ = [
    "INF",
    "InputWatermarks",
    "KeyedWindows",
    "WindowSpec",
    "is_marker",
    "is_marker_batch",
    "marker",
    "marker_value",
]


def marker(t: float, idle: float | None) -> ExtType:
    """The marker of watermark ``t``; ``idle`` is how long its channel may stay
    silent before receivers stop waiting for it (None: wait for ever)."""
    return ExtType(WATERMARK_CODE, _MARK.pack(t, -1.0 if idle is None else idle))


def marker_value(m: ExtType) -> tuple[float, float | None]:
    t, idle = _MARK.unpack(m.data)
    return t, (None if idle < 0 else idle)


def is_marker(r: Any) -> bool:
    return type(r) is ExtType and r.code == WATERMARK_CODE


def is_marker_batch(records: list[Any]) -> bool:
    """Whether a batch is a watermark marker (markers always travel alone)."""
    return len(records) == 1 and type(records[0]) is ExtType and records[0].code == WATERMARK_CODE


class InputWatermarks:
    """The watermark of each input channel of an instance, and the instance's own.

    The instance's watermark is the minimum over its input channels, leaving out
    a channel that has been silent (no batch, no marker) for longer than its
    idle timeout; while every input is idle it holds. A channel not heard from
    yet counts as ``-inf`` (it holds the watermark back) until it is idle. The
    result never goes down (:attr:`out`).
    """

    __slots__ = ("idle", "out", "seen", "wm")

    def __init__(self, out: float = NEG_INF) -> None:
        self.wm: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.idle: dict[str, float | None] = {}
        self.out = out

    def saw(self, channel: str, now: float) -> None:
        """A batch arrived on ``channel`` (it is not idle)."""
        self.seen[channel] = now

    def observe(self, channel: str, t: float, idle: float | None, now: float) -> None:
        """``channel`` delivered the marker of watermark ``t``."""
        if t > self.wm.get(channel, NEG_INF):
            self.wm[channel] = t
        self.seen[channel] = now
        self.idle[channel] = idle

    def idle_timeout(self) -> float | None:
        """The idle timeout markers carry (the smallest known); None if none has one."""
        known = [i for i in self.idle.values() if i is not None]
        return min(known) if known else None

    def advance(self, inputs: Iterable[str], now: float) -> float | None:
        """The new watermark if it rose above :attr:`out`, else None."""
        inputs = set(inputs)
        for d in (self.wm, self.seen, self.idle):
            for ch in [c for c in d if c not in inputs]:
                del d[ch]  # an ended or removed channel holds nothing back
        default = self.idle_timeout()
        lo, active = INF, False
        for ch in inputs:
            last = self.seen.setdefault(ch, now)
            timeout = self.idle.get(ch, default)
            if timeout is not None and now - last > timeout:
                continue
            active = True
            w = self.wm.get(ch, NEG_INF)
            if w < lo:
                lo = w
        if not active or lo <= self.out:
            return None
        self.out = lo
        return lo


# -- windows -----------------------------------------------------------------
WINDOW_KINDS = ("tumbling", "sliding", "session")


@dataclass(frozen=True)
class WindowSpec:
    """What windows a record falls in: ``tumbling`` (``size``), ``sliding``
    (``size``, every ``slide``) or ``session`` (closed after ``gap`` of silence)."""

    kind: str
    size: float = 0.0
    slide: float = 0.0
    gap: float = 0.0

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> WindowSpec:
        return cls(c["kind"], c.get("size", 0), c.get("slide", 0), c.get("gap", 0))

    def problems(self) -> list[str]:
        """What is wrong with the spec, one phrase each (empty when valid)."""
        out: list[str] = []
        if self.kind not in WINDOW_KINDS:
            return [f"unknown window kind {self.kind!r}; use one of {', '.join(WINDOW_KINDS)}"]
        fields = {"tumbling": ("size",), "sliding": ("size", "slide"), "session": ("gap",)}
        for f in fields[self.kind]:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                out.append(f"the window {f} must be a finite number, got {v!r}")
            elif v <= 0:
                out.append(f"the window {f} must be > 0, got {v!r}")
        if not out and self.kind == "sliding" and self.slide > self.size:
            out.append(
                f"the window slide ({self.slide!r}) is larger than its size ({self.size!r}); "
                "records between windows would be in none"
            )
        return out

    def assign(self, ts: float) -> list[tuple[float, float]]:
        """The windows ``[start, end)`` a record at ``ts`` falls in (not sessions)."""
        if self.kind == "tumbling":
            start = ts // self.size * self.size
            return [(start, start + self.size)]
        size, slide = self.size, self.slide
        start = ts // slide * slide
        out = []
        while start > ts - size:
            out.append((start, start + size))
            start -= slide
        return out


# An open window of one key: [accumulator (or records), fired, has a record].
ACC, FIRED, HAS = 0, 1, 2
_NONE: tuple[Any, ...] = ()  # "no window fired again" without a new list per record


class Fired(NamedTuple):
    """A window result: ``value`` is the aggregate, or the records of the window;
    ``update`` when a late record changed a window that had fired already."""

    key: Any
    start: float
    end: float
    value: Any
    update: bool


class KeyedWindows:
    """The open windows of every key of one windowed PE instance.

    ``add`` puts a record (with its timestamp) in its windows, or returns None
    when it is late for all of them (its windows closed: end + lateness <= the
    watermark). ``advance`` fires the windows the watermark has passed and drops
    those past their allowed lateness. In aggregate mode a window holds
    ``fn(acc | None, record)`` (sessions that merge combine theirs with
    ``merge(a, b)``); otherwise it holds its records.
    """

    def __init__(
        self,
        spec: WindowSpec,
        lateness: float = 0.0,
        aggregate: Callable[[Any, Any], Any] | None = None,
        merge: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.spec = spec
        self.lateness = lateness
        self.aggregate = aggregate
        self.merge = merge
        self.watermark = NEG_INF
        self.keys: dict[Any, dict[tuple[float, float], list[Any]]] = {}
        # When each open window is due (its end, then end + lateness once fired):
        # the (key, window) pairs due at each time, in the order they were added,
        # and a heap of those times. Windows of every key share their ends, so a
        # new window is mostly an append to an existing time's list.
        self._due: dict[float, list[tuple[Any, tuple[float, float]]]] = {}
        self._times: list[float] = []
        self._session = spec.kind == "session"
        self._size = spec.size
        self._slide = spec.slide if spec.kind == "sliding" else spec.size
        # The windows of the last record's start (at that closed time), reused while
        # the records' start and the watermark stay the same: with a size that is a
        # multiple of the slide, every record of a start is in the same windows.
        self._targets: tuple[float, float, tuple[tuple[float, float], ...]] = (NAN, NAN, ())
        self._per_start = not self._session and self._size % self._slide == 0

    # -- records -------------------------------------------------------------
    def add(self, key: Any, ts: float, record: Any) -> Sequence[Fired] | None:
        """Put ``record`` in its windows; None when it is late for every one of
        them, else the windows it updated that had fired already (late firing)."""
        closed = self.watermark - self.lateness  # a window ending at or below is closed
        wins = self.keys.get(key)
        if self._session:
            if ts + self.spec.gap <= closed:
                return None  # every session it could join or start has closed
            targets: Iterable[tuple[float, float]] = (self._session_of(key, wins, ts),)
            wins = self.keys[key]
        else:
            size, slide = self._size, self._slide
            start = ts // slide * slide
            if start + size <= closed:
                return None  # its latest window closed, so did the earlier ones
            if wins is None:
                wins = self.keys[key] = {}
            last = self._targets
            if last[0] == start and last[1] == closed:
                targets = last[2]  # the windows of the record before (records in order)
            else:
                found = []
                s = start
                while s > ts - size:
                    if s + size > closed:
                        found.append((s, s + size))
                    s -= slide
                targets = tuple(found)
                if self._per_start:
                    self._targets = (start, closed, targets)
        agg = self.aggregate
        fired: Sequence[Fired] = _NONE
        for w in targets:
            win = wins.get(w)
            if win is None:
                if agg is None:
                    wins[w] = [[record], False, True]
                else:
                    wins[w] = [agg(None, record), False, True]
                due = self._due.get(w[1])
                if due is None:
                    self._due[w[1]] = [(key, w)]
                    heapq.heappush(self._times, w[1])
                else:
                    due.append((key, w))
                continue
            if agg is None:
                win[ACC].append(record)
            else:
                win[ACC] = agg(win[ACC] if win[HAS] else None, record)
            win[HAS] = True
            if win[FIRED]:
                if fired is _NONE:
                    fired = []
                fired.append(Fired(key, w[0], w[1], win[ACC], True))  # type: ignore[attr-defined]
        return fired

    def _session_of(
        self, key: Any, wins: dict[tuple[float, float], list[Any]] | None, ts: float
    ) -> tuple[float, float]:
        """The session window of a record at ``ts``: ``[ts, ts + gap)`` merged with
        every open session of the key it overlaps or touches."""
        start, end = ts, ts + self.spec.gap
        if wins is None:
            wins = self.keys[key] = {}
        if not wins:
            return (start, end)
        over = [w for w in wins if w[0] <= end and w[1] >= start]
        if not over or (len(over) == 1 and over[0][0] <= start and over[0][1] >= end):
            return over[0] if over else (start, end)
        start = min([start] + [w[0] for w in over])
        end = max([end] + [w[1] for w in over])
        merged: list[Any] = [None if self.aggregate else [], False, False]
        for w in sorted(over):
            old = wins.pop(w)
            if not old[HAS]:
                continue
            if not merged[HAS]:
                merged[ACC] = old[ACC]
            elif self.aggregate is None:
                merged[ACC].extend(old[ACC])
            else:
                assert self.merge is not None
                merged[ACC] = self.merge(merged[ACC], old[ACC])
            merged[HAS] = True
            merged[FIRED] = merged[FIRED] or old[FIRED]
        wins[(start, end)] = merged
        self._push(end, key, (start, end))
        return (start, end)

    def _push(self, t: float, key: Any, w: tuple[float, float]) -> None:
        """Window ``w`` of ``key`` is due at ``t``."""
        due = self._due.get(t)
        if due is None:
            self._due[t] = [(key, w)]
            heapq.heappush(self._times, t)
        else:
            due.append((key, w))

    # -- the watermark ---------------------------------------------------------
    def advance(self, watermark: float) -> list[Fired]:
        """Raise the watermark; fire every window whose end it reached and drop
        those whose end + lateness it reached. Results in order of window end."""
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        out: list[Fired] = []
        times, due, late, keys = self._times, self._due, self.lateness, self.keys
        pop = heapq.heappop
        while times and times[0] <= watermark:
            for key, w in due.pop(pop(times)):
                wins = keys.get(key)
                win = wins.get(w) if wins is not None else None
                if win is None:
                    continue  # merged into another session, or dropped
                if not win[FIRED]:
                    win[FIRED] = True
                    if win[HAS]:
                        out.append(Fired(key, w[0], w[1], win[ACC], False))
                if w[1] + late <= watermark:
                    del wins[w]  # type: ignore[union-attr]
                    if not wins:
                        del keys[key]
                else:
                    self._push(w[1] + late, key, w)  # later than the watermark
        return out

    # -- state -----------------------------------------------------------------
    def snapshot(self) -> dict[Any, Any]:
        """``{key: [[start, end, acc, fired, has], ...]}`` and the watermark under
        :data:`REPLICATED_KEY` (every part of a split gets it)."""
        state: dict[Any, Any] = {
            k: [[w[0], w[1], win[ACC], win[FIRED], win[HAS]] for w, win in wins.items()]
            for k, wins in self.keys.items()
        }
        state[REPLICATED_KEY] = {"watermark": self.watermark}
        return state

    def restore(self, items: Iterable[tuple[Any, Any]]) -> None:
        """Take over keyed window state (pairs as :meth:`snapshot` makes them); the
        watermark becomes the highest of the predecessors'."""
        for key, value in items:
            if key == REPLICATED_KEY:
                if isinstance(value, dict):
                    self.watermark = max(self.watermark, float(value.get("watermark", NEG_INF)))
                continue
            wins = self.keys.setdefault(key, {})
            for start, end, acc, fired, has in value:
                w = (start, end)
                wins[w] = [acc, bool(fired), bool(has)]
                self._push(end + self.lateness if fired else end, key, w)

    def open_windows(self) -> int:
        return sum(len(w) for w in self.keys.values())


# -- joins ---------------------------------------------------------------------
class IntervalJoin:
    """Per key, every left record ``a`` joins every right record ``b`` with
    ``a.t + lower <= b.t <= a.t + upper``, whichever comes first.

    Each side's records are kept until the watermark shows no record of the
    other side can still match them (left: ``a.t + upper < watermark``; right:
    ``b.t - lower < watermark``). A record below the watermark is late: it joins
    nothing and is refused (``add`` returns None).
    """

    def __init__(self, lower: float, upper: float) -> None:
        self.lower = lower
        self.upper = upper
        self.watermark = NEG_INF
        self.keys: dict[Any, tuple[list[list[Any]], list[list[Any]]]] = {}
        self._heap: list[tuple[float, int, Any, int, float]] = []
        self._seq = 0

    def add(self, side: int, key: Any, ts: float, record: Any) -> list[tuple[Any, Any]] | None:
        """Put ``record`` (side 0: left, 1: right) in; the pairs it completes, as
        (left, right); None when it is late."""
        if ts < self.watermark:
            return None
        bufs = self.keys.get(key)
        if bufs is None:
            bufs = self.keys[key] = ([], [])
        lo, hi = self.lower, self.upper
        if side == 0:
            pairs = [(record, r) for t, r in bufs[1] if ts + lo <= t <= ts + hi]
            expiry = ts + hi
        else:
            pairs = [(r, record) for t, r in bufs[0] if t + lo <= ts <= t + hi]
            expiry = ts - lo
        bufs[side].append([ts, record])
        self._seq += 1
        heapq.heappush(self._heap, (expiry, self._seq, key, side, ts))
        return pairs

    def advance(self, watermark: float) -> None:
        """Raise the watermark and drop what can no longer join."""
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        heap = self._heap
        while heap and heap[0][0] < watermark:
            _e, _s, key, side, ts = heapq.heappop(heap)
            bufs = self.keys.get(key)
            if bufs is None:
                continue
            buf = bufs[side]
            for i, (t, _r) in enumerate(buf):
                if t == ts:
                    del buf[i]
                    break
            if not bufs[0] and not bufs[1]:
                del self.keys[key]

    def snapshot(self) -> dict[Any, Any]:
        state: dict[Any, Any] = {k: [left, right] for k, (left, right) in self.keys.items()}
        state[REPLICATED_KEY] = {"watermark": self.watermark}
        return state

    def restore(self, items: Iterable[tuple[Any, Any]]) -> None:
        for key, value in items:
            if key == REPLICATED_KEY:
                if isinstance(value, dict):
                    self.watermark = max(self.watermark, float(value.get("watermark", NEG_INF)))
                continue
            bufs = self.keys.setdefault(key, ([], []))
            for side in (0, 1):
                for ts, record in value[side]:
                    bufs[side].append([ts, record])
                    expiry = ts + self.upper if side == 0 else ts - self.lower
                    self._seq += 1
                    heapq.heappush(self._heap, (expiry, self._seq, key, side, ts))


# -- timers --------------------------------------------------------------------
EVENT, PROCESSING = "event", "processing"


class Timers:
    """The timers of a keyed class PE, per key: event time (they fire when the
    watermark reaches them) and processing time (when the wall clock,
    ``time.time()``, does). ``ctx.timers`` in the PE; a timer is for the key of
    the record being processed (``ctx.key``), set once per key, time and kind.
    """

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._set: set[tuple[str, Any, float]] = set()
        self._heaps: dict[str, list[tuple[float, int, Any]]] = {EVENT: [], PROCESSING: []}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._set)

    def _key(self) -> Any:
        key = self._ctx.key
        if key is None:
            raise ValueError(
                "timers belong to a key: register them in process() of a keyed PE "
                "(.key_by(fn).process(...)) or in on_timer()"
            )
        return key

    def event(self, t: float) -> None:
        """Call ``on_timer(t, "event")`` for the current key once the watermark reaches ``t``."""
        self._add(EVENT, self._key(), t)

    def processing(self, t: float) -> None:
        """Call ``on_timer(t, "processing")`` for the current key at wall-clock time ``t``."""
        self._add(PROCESSING, self._key(), t)

    def cancel(self, t: float, kind: str = EVENT) -> None:
        """Drop the current key's timer at ``t`` (no error if there is none)."""
        self._set.discard((kind, self._key(), t))

    def _add(self, kind: str, key: Any, t: float) -> None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
            raise ValueError(f"a timer's time must be a number, got {t!r}")
        entry = (kind, key, t)
        if entry in self._set:
            return
        self._set.add(entry)
        self._seq += 1
        heapq.heappush(self._heaps[kind], (t, self._seq, key))

    def due(self, kind: str, now: float) -> list[tuple[Any, float]]:
        """Remove and return the ``(key, t)`` of ``kind`` with ``t <= now``, in time order."""
        heap, out = self._heaps[kind], []
        while heap and heap[0][0] <= now:
            t, _s, key = heapq.heappop(heap)
            entry = (kind, key, t)
            if entry in self._set:
                self._set.discard(entry)
                out.append((key, t))
        return out

    def next_processing(self) -> float | None:
        """When the next processing-time timer is due (None: none set)."""
        heap = self._heaps[PROCESSING]
        while heap and (PROCESSING, heap[0][2], heap[0][0]) not in self._set:
            heapq.heappop(heap)  # cancelled
        return heap[0][0] if heap else None

    def snapshot(self) -> list[list[Any]]:
        return [[kind, key, t] for kind, key, t in self._set]

    def restore(self, items: Iterable[list[Any]]) -> None:
        """Take over timers (``[kind, key, t]`` each, as :meth:`snapshot` makes them;
        a split by key gives each successor those of its keys)."""
        for kind, key, t in items:
            if kind in self._heaps:
                self._add(kind, hashable_key(key), t)
