"""Holding a worker's output while the master may have fenced it.

A worker that did not run for a while (SIGSTOP, a host paused, a machine swapping)
cannot know whether the master declared it dead meanwhile and restarted its apps
elsewhere. Until the master answers, its sources emit nothing and its sinks
write nothing, so a fenced worker adds as little duplicate output as possible
next to its replacements:

* The worker's clock thread ticks every :data:`TICK_S`. A tick that comes more
  than ``limit`` (half the master's heartbeat timeout) after the previous one
  means the process stood still: output is held (:meth:`OutputHold.suspect`).
  Sources and sinks check :meth:`OutputHold.held` before each batch, and that
  check sees the gap itself, so nothing goes out even before the clock thread
  ran again.
* The hold ends when the master answers a heartbeat sent after the hold began
  (the session is current: nothing was fenced), or when the master cannot be
  reached at all: a master that is down must not stop the data flow.
* When the master answers that the session was fenced, the hold becomes firm
  (:meth:`OutputHold.fence`): it ends only once the worker registered again and
  stopped every instance the master named stale.

Only the master's positive answer stops instances; silence never does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often the worker's clock thread looks at the time


class OutputHold:
    """Whether this worker's sources and sinks may put records out right now."""

    def __init__(self, worker: str):
        self.worker = worker
        self.limit = math.inf  # a standstill longer than this holds output (set on registration)
        self.ticked = time.monotonic()  # the clock thread's last tick
        self.reason = ""  # why output is held; "" while it flows
        self.fenced = False  # the master said so: held until registered again
        self.since = 0.0  # monotonic time the current hold began
        self.on_hold: Callable[[], None] = lambda: None  # ask the master now
        self._lock = threading.Lock()
        self._waiters: list[asyncio.Future[None]] = []

    def held(self) -> bool:
        """On the loop, before a source emits or a sink writes: must it wait?"""
        if self.reason:
            return True
        gap = time.monotonic() - self.ticked
        if gap > self.limit:
            self.suspect(f"it did not run for {gap:.1f} s")
            return True
        return False

    async def wait(self) -> None:
        """Return once output may flow again."""
        loop = asyncio.get_running_loop()
        while self.held():
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait({fut}, timeout=1.0)  # looks again now and then
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def tick(self) -> float:
        """From the clock thread: note the time; a long standstill holds output.
        Returns how long it was since the previous tick."""
        now = time.monotonic()
        gap = now - self.ticked
        if gap > self.limit:
            self.suspect(f"it did not run for {gap:.1f} s")  # before ``ticked`` moves on
        self.ticked = now
        return gap

    def suspect(self, why: str) -> None:
        """Hold output until the master answers (any thread)."""
        with self._lock:
            if self.reason:
                return
            self.since = time.monotonic()
            self.reason = why
        log.warning(
            "worker %s: %s, longer than half the heartbeat timeout; its sources and sinks "
            "hold their output until the master answers (it may have declared this "
            "worker dead meanwhile)",
            self.worker,
            why,
        )
        self.on_hold()

    def fence(self, why: str) -> None:
        """The master fenced this worker's session: hold until it registered again."""
        with self._lock:
            if not self.reason:
                self.since = time.monotonic()
            self.reason = why
            self.fenced = True

    def release(self, why: str, sent_at: float | None = None) -> bool:
        """On the loop: output flows again. With ``sent_at`` (when the answer's request
        was sent), an answer older than the hold, or a hold the master made firm, stays."""
        with self._lock:
            if not self.reason:
                return False
            if sent_at is not None and (self.fenced or sent_at < self.since):
                return False
            held_for = time.monotonic() - self.since
            self.reason = ""
            self.fenced = False
            waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        log.warning(
            "worker %s: sources and sinks resume after %.2f s on hold: %s",
            self.worker,
            held_for,
            why,
        )
        return True
