"""The executors of the event-time PE kinds: timestamp assigners and windows.

An assigner (kind ``timestamps``) passes records through unchanged and keeps the
largest timestamp it has seen; its watermark is that minus the allowed
out-of-orderness. A windowed PE (kind ``window``) puts each record in its
key's windows (:class:`hotwire.eventtime.KeyedWindows`) and fires them when the
instance's watermark passes their end; records too late for every window go
to the PE's late side output. The instance around them
(``hotwire.worker.instance``) receives, combines and forwards the watermark
markers.
"""

from __future__ import annotations

import math
from typing import Any

from hotwire.eventtime import NEG_INF, Fired, IntervalJoin, KeyedWindows, WindowSpec
from hotwire.pe.executors import Executor, _keyed_items
from hotwire.plan import parse_instance_id


class TimestampError(ValueError):
    """A timestamp function returned something that is not a finite number."""


_NUMBERS = (int, float)  # not bool: type(True) is bool
_INF = math.inf


def _timestamp(fn: Any, record: Any) -> float:
    t = fn(record)
    if type(t) not in _NUMBERS or not -_INF < t < _INF:
        raise TimestampError(f"the timestamp function returned {t!r}; return a finite number")
    return t


class TimestampExecutor(Executor):
    """``fn(record) -> timestamp``: records pass through; the watermark follows them."""

    def __init__(self, fn: Any, ctx: Any, on_error: Any, key_fn: Any = None):
        super().__init__(fn, ctx, on_error, key_fn)
        config = ctx.config
        self.delay = float(config.get("out_of_orderness", 0.0))
        idle = config.get("idle_timeout")
        self.idle: float | None = None if idle is None else float(idle)
        self.interval = float(config.get("watermark_interval", 0.05))
        self.max_ts = NEG_INF
        self.emitted = NEG_INF  # the highest watermark this PE sent (kept in state)

    async def process(self, records: list[Any]) -> list[Any]:
        fn = self.fn
        out: list[Any] = []
        top = self.max_ts

        def step(r: Any) -> None:
            nonlocal top
            t = fn(r)
            if type(t) not in _NUMBERS or not -_INF < t < _INF:
                t = _timestamp(fn, r)  # raises, with the message
            if t > top:
                top = t
            out.append(r)

        await self._each(records, step)
        self.max_ts = top
        return out

    def watermark(self) -> float:
        """The watermark the records so far allow: largest timestamp - out-of-orderness."""
        return self.max_ts - self.delay

    def snapshot(self) -> Any:
        return {"max_ts": self.max_ts, "emitted": self.emitted}

    def restore(self, states: list[Any]) -> None:
        for s in states:
            if isinstance(s, dict):
                self.max_ts = max(self.max_ts, float(s.get("max_ts", NEG_INF)))
                self.emitted = max(self.emitted, float(s.get("emitted", NEG_INF)))


class WindowExecutor(Executor):
    """Keyed windows over event time; ``fn`` aggregates (``fn(acc | None, record)``)
    or, in process mode, gets each fired window's records (``fn(key, (start, end),
    records) -> iterable``)."""

    keyed = True

    def __init__(
        self,
        fn: Any,
        ctx: Any,
        on_error: Any,
        key_fn: Any = None,
        *,
        ts_fn: Any,
        merge_fn: Any = None,
    ):
        super().__init__(fn, ctx, on_error, key_fn)
        config = ctx.config
        w = config["window"]
        self.mode = w.get("mode", "aggregate")
        self.ts_fn = ts_fn
        self.windows = KeyedWindows(
            WindowSpec.from_config(w),
            float(w.get("allowed_lateness", 0.0)),
            aggregate=fn if self.mode == "aggregate" else None,
            merge=merge_fn,
        )
        self.late_to = frozenset(config.get("late_to", ()))
        self.late: list[Any] = []  # records too late for every window: the side output
        # Results of late records' updates, sent after the batch to every output but
        # the late side output (process() returns nothing: the instance routes them).
        self.out: list[Any] = []

    @property
    def watermark(self) -> float:
        return self.windows.watermark

    async def process(self, records: list[Any]) -> list[Any]:
        key_fn, ts_fn, add = self.key_fn, self.ts_fn, self.windows.add
        out, late = self.out, self.late

        def step(r: Any) -> None:
            t = ts_fn(r)
            if type(t) not in _NUMBERS or not -_INF < t < _INF:
                t = _timestamp(ts_fn, r)  # raises, with the message
            fired = add(key_fn(r), t, r)
            if fired is None:
                late.append(r)
            elif fired:
                out.extend(self._results(fired))

        await self._each(records, step)
        return []

    def advance(self, watermark: float) -> list[Any]:
        """The results of the windows the watermark ``watermark`` closes."""
        return self._results(self.windows.advance(watermark))

    def _results(self, fired: list[Fired]) -> list[Any]:
        version = getattr(self.ctx, "version", 0)
        if self.mode == "aggregate":
            return [
                {
                    "key": f.key,
                    "start": f.start,
                    "end": f.end,
                    "value": f.value,
                    "update": f.update,
                    "version": version,
                }
                for f in fired
            ]
        out: list[Any] = []
        for f in fired:
            try:
                out.extend(self.fn(f.key, (f.start, f.end), list(f.value)))
            except Exception as e:
                self.on_error({"key": f.key, "start": f.start, "end": f.end}, e)
        return out

    def take_out(self) -> list[Any]:
        out, self.out = self.out, []
        return out

    def take_late(self) -> list[Any]:
        late, self.late = self.late, []
        return late

    def snapshot(self) -> Any:
        return self.windows.snapshot()

    def restore(self, states: list[Any]) -> None:
        for s in states:
            if s:
                self.windows.restore(_keyed_items(s))


class JoinExecutor(Executor):
    """A keyed join of two streams by event time: an interval join, or a window
    join (pairs of the two sides' records in each fired window). ``sides`` names,
    per input, its upstream PE, timestamp function and key function; the
    instance sets :attr:`side` from each batch's channel."""

    keyed = True

    def __init__(
        self, fn: Any, ctx: Any, on_error: Any, key_fn: Any = None, *, sides: Any = ()
    ):
        super().__init__(fn, ctx, on_error, key_fn)
        self.sides = tuple(sides)
        self.side = 0
        self._side_of: dict[str, int] = {}
        j = ctx.config["join"]
        self.interval: IntervalJoin | None = None
        self.windows: KeyedWindows | None = None
        if j.get("kind") == "interval":
            self.interval = IntervalJoin(j["lower"], j["upper"])
        else:
            self.windows = KeyedWindows(WindowSpec.from_config(j))
        self.out: list[Any] = []
        self.late = 0  # records below the watermark: they join nothing

    @property
    def watermark(self) -> float:
        part = self.interval if self.interval is not None else self.windows
        assert part is not None
        return part.watermark

    def set_channel(self, channel: str) -> None:
        """The next batch comes on ``channel``: which side it is."""
        side = self._side_of.get(channel)
        if side is None:
            pe = parse_instance_id(channel.split(">", 1)[0])[0]
            names = [s[0] for s in self.sides]
            side = self._side_of[channel] = names.index(pe) if pe in names else -1
        self.side = side

    async def process(self, records: list[Any]) -> list[Any]:
        side = self.side
        if side < 0:
            for r in records:
                self.on_error(r, ValueError("a join got a record from neither of its inputs"))
            return []
        _pe, ts_fn, key_fn = self.sides[side]
        out, fn = self.out, self.fn
        interval, windows = self.interval, self.windows

        def step(r: Any) -> None:
            k = key_fn(r)
            t = _timestamp(ts_fn, r)
            if interval is not None:
                pairs = interval.add(side, k, t, r)
                if pairs is None:
                    self.late += 1
                    return
                for a, b in pairs:
                    j = fn(a, b)
                    if j is not None:
                        out.append(j)
            else:
                assert windows is not None
                if windows.add(k, t, [side, r]) is None:
                    self.late += 1

        await self._each(records, step)
        return []

    def advance(self, watermark: float) -> list[Any]:
        if self.interval is not None:
            self.interval.advance(watermark)
            return []
        assert self.windows is not None
        out: list[Any] = []
        for f in self.windows.advance(watermark):
            left = [r for s, r in f.value if s == 0]
            right = [r for s, r in f.value if s == 1]
            for a in left:
                for b in right:
                    try:
                        j = self.fn(a, b)
                    except Exception as e:
                        self.on_error([a, b], e)
                        continue
                    if j is not None:
                        out.append(j)
        return out

    def take_out(self) -> list[Any]:
        out, self.out = self.out, []
        return out

    def take_late(self) -> list[Any]:
        return []

    late_to: frozenset[str] = frozenset()

    def snapshot(self) -> Any:
        part = self.interval if self.interval is not None else self.windows
        assert part is not None
        return part.snapshot()

    def restore(self, states: list[Any]) -> None:
        part = self.interval if self.interval is not None else self.windows
        assert part is not None
        for s in states:
            if s:
                part.restore(_keyed_items(s))
