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

from hotwire.eventtime import NEG_INF, Fired, KeyedWindows, WindowSpec
from hotwire.pe.executors import Executor, _keyed_items


class TimestampError(ValueError):
    """A timestamp function returned something that is not a finite number."""


def _timestamp(fn: Any, record: Any) -> float:
    t = fn(record)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
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
            t = _timestamp(fn, r)
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
        key_fn, ts_fn, windows = self.key_fn, self.ts_fn, self.windows
        out, late = self.out, self.late

        def step(r: Any) -> None:
            k = key_fn(r)
            fired = windows.add(k, _timestamp(ts_fn, r), r)
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
