"""The source side of the connector API: partitions, positions, replay.

A :class:`PartitionedSource` reads partitions (files, stream shards, topic
partitions), each from a position (a byte offset, an entry id, an offset).
The runtime checkpoints one number per source instance, ``ctx.position``: how
many records the instance emitted over all its generations. The
:class:`PositionLog` maps that count to one position per partition: before the
source yields a batch it appends ``[count, partition, position before, position
after, n]`` to a log file and flushes it. A source that starts with
``ctx.position == N`` (a recovery from a checkpoint, or an upgrade's handover)
replays the log up to record ``N`` and resumes every partition from there, so a
record counted in the checkpoint is never read again and none after it is
skipped. When ``N`` falls inside a batch the source reads the first records of
that batch again to find the position between them, so :meth:`read` must be
deterministic: the same position and limit give the same records (true of
append-only partitions).

When the source's parallelism changed (``ctx.predecessors`` lists old instances
of another parallelism), the new instance reads each old instance's log up to
that instance's handed-over count, merges the positions, keeps the partitions it
owns and starts its own log from them: a rescale reads nothing twice and skips
nothing.

Subclass it with :meth:`partitions` and :meth:`read`; pass an instance as the
source function: ``app.source("src", MySource(option=...))``.
"""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["PartitionedSource", "PositionLog", "check_options", "check_typed_options"]


def check_options(name: str, config: dict[str, Any], known: dict[str, str]) -> list[str]:
    """The unknown options of ``config`` as a list of problems (empty when none)."""
    unknown = sorted(set(config) - set(known))
    if not unknown:
        return []
    return [f"{name}: unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"]


def check_typed_options(who: str, given: dict[str, Any], allowed: dict[str, Any]) -> None:
    """Raise ValueError, in one line, for an option of ``given`` not in ``allowed``
    (name -> type, or a tuple of types for a number) or of the wrong type."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        msg = (
            f"{who}: unknown option {', '.join(map(repr, unknown))}; "
            f"the options are {', '.join(sorted(allowed))}"
        )
        raise ValueError(msg)
    for name, kind in allowed.items():
        v = given.get(name)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            what = "number" if isinstance(kind, tuple) else kind.__name__
            msg = f"{who}: option {name}={v!r} must be of type {what}"
            raise ValueError(msg)


class PartitionedSource(ABC):
    """A source made of partitions, each read from a checkpointed position.

    The runtime calls the object with the instance's context (``source(ctx)``)
    once per instance generation; it returns an async iterator of records.
    Partition ``p`` belongs to instance ``crc32(p) % parallelism``. Options are
    checked in the constructor, which runs when the app file is loaded, so
    ``streamctl submit`` refuses a bad one before anything is deployed.
    """

    batch = 500  # records read from one partition at a time
    poll_interval = 0.1  # seconds to wait when no partition had anything new

    @abstractmethod
    def partitions(self) -> list[str]:
        """Every partition now (called again while tailing, to find new ones)."""

    @abstractmethod
    def read(self, partition: str, position: Any, limit: int) -> tuple[list[Any], Any]:
        """Up to ``limit`` records of ``partition`` from ``position``, and the position
        after them (``position`` itself when there is nothing new). Deterministic;
        runs in a thread, never concurrently for one source instance."""

    def initial_position(self, partition: str) -> Any:
        """Where a partition is read from when no position was recorded for it."""
        return 0

    @abstractmethod
    def log_path(self, ctx: Any) -> Path:
        """The position log of instance ``ctx.instance`` (shared storage when the
        instance may move to another machine, like the partitions themselves)."""

    def owns(self, partition: str, ctx: Any) -> bool:
        n = max(1, int(getattr(ctx, "parallelism", 1) or 1))
        return zlib.crc32(partition.encode()) % n == int(getattr(ctx, "instance", 0) or 0)

    def __call__(self, ctx: Any) -> AsyncIterator[Any]:
        return self._run(ctx)

    async def _run(self, ctx: Any) -> AsyncIterator[Any]:
        count = int(getattr(ctx, "position", 0) or 0)
        log = PositionLog(self.log_path(ctx))
        n = max(1, int(getattr(ctx, "parallelism", 1) or 1))
        preds = list(getattr(ctx, "predecessors", None) or ())
        if any(p.get("of") != n for p in preds):
            # Rescaled: merge the old instances' positions, keep the partitions it owns.
            merged = await asyncio.to_thread(self._merged_positions, ctx, preds)
            positions = {p: pos for p, pos in merged.items() if self.owns(p, ctx)}
            await asyncio.to_thread(log.start, count, positions)
        else:  # a fresh start (no predecessors) ignores an old log
            positions = await asyncio.to_thread(log.recover, count, self.read, bool(preds))
        try:
            async for r in self._tail(ctx, log, count, positions):
                yield r
        finally:
            log.close()

    def _merged_positions(self, ctx: Any, preds: list[dict[str, Any]]) -> dict[str, Any]:
        """Every partition's position after each predecessor's handed-over count,
        read from the predecessors' logs (left as they are: other new instances
        read them too)."""
        merged: dict[str, Any] = {}
        for p in preds:
            old = SimpleNamespace(
                app=ctx.app, pe=ctx.pe, instance=int(p["instance"]), parallelism=int(p["of"])
            )
            merged.update(
                PositionLog(self.log_path(old)).positions_at(int(p["position"]), self.read)
            )
        return merged

    async def _tail(
        self, ctx: Any, log: PositionLog, count: int, positions: dict[str, Any]
    ) -> AsyncIterator[Any]:
        while True:
            progressed = False
            for p in sorted(
                q for q in await asyncio.to_thread(self.partitions) if self.owns(q, ctx)
            ):
                before = positions.get(p, self.initial_position(p))
                records, after = await asyncio.to_thread(self.read, p, before, self.batch)
                if not records:
                    continue
                log.append(count, p, before, after, len(records))
                for r in records:
                    yield r
                count += len(records)
                positions[p] = after
                progressed = True
            if not progressed:
                await asyncio.sleep(self.poll_interval)


class PositionLog:
    """Record count -> position per partition, for one source instance (see module doc)."""

    def __init__(self, path: Path):
        self.path = path
        self._file: Any = None

    def recover(self, count: int, read: Any, restored: bool = True) -> dict[str, Any]:
        """The position of every partition after ``count`` records; rewrites the log
        to that point (atomically: a predecessor still holding the old file writes
        into an unlinked one). ``restored``: the count comes from a checkpoint or a
        handover, so even at 0 the log's base holds (a rescaled instance's)."""
        positions = self.positions_at(count, read, restored)
        self.start(count, positions)
        return positions

    def positions_at(self, count: int, read: Any, restored: bool = True) -> dict[str, Any]:
        """The position of every partition after ``count`` records (read only)."""
        positions: dict[str, Any] = {}
        seen = 0
        if count > 0 or (restored and self.path.exists()):
            if not self.path.exists():
                msg = (
                    f"the source resumes at record {count} but its position log {self.path} "
                    "does not exist (a rescaled source, or the log was removed); the "
                    "positions cannot be recovered"
                )
                raise RuntimeError(msg)
            for entry in self._entries():
                if "base" in entry:
                    if entry["count"] > count:
                        break
                    positions, seen = dict(entry["base"]), entry["count"]
                    continue
                c, p, before, after, n = entry["batch"]
                if c >= count:
                    break
                k = min(n, count - c)
                positions[p] = after if k == n else read(p, before, k)[1]
                seen = c + k
            if seen < count:
                msg = f"position log {self.path} covers {seen} records, the checkpoint {count}"
                raise RuntimeError(msg)
        return positions

    def start(self, count: int, positions: dict[str, Any]) -> None:
        """Begin the log afresh at record ``count`` with ``positions`` and open it for
        appends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"count": count, "base": positions}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # kept open for appends

    def _entries(self) -> list[dict[str, Any]]:
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn by a crash: its records were never yielded
                out.append(json.loads(line))
        return out

    def append(self, count: int, partition: str, before: Any, after: Any, n: int) -> None:
        """Record a batch before its records are yielded (flushed: survives SIGKILL)."""
        self._file.write(json.dumps({"batch": [count, partition, before, after, n]}) + "\n")
        self._file.flush()

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
