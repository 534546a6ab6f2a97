"""Waiting for a server that went away: backoff, one log line per outage, status.

A connector whose server (Redis, PostgreSQL, NATS) stops answering does not fail
its PE instance: it retries the same call with exponential backoff (doubling
from :data:`BACKOFF_INITIAL_S` up to :data:`BACKOFF_MAX_S`, each delay drawn at
random between half and all of it, so instances do not retry in step) until the
server answers again. Meanwhile the instance processes nothing more, so its
inbox fills to its channels' credits and its senders stop: records wait
upstream, in bounded memory, and nothing is lost.

An :class:`Outage` logs one warning when the server becomes unreachable and
one when it answers again (with how long it was down and how many retries it
took), never one per attempt, and sets the instance context's ``waiting`` and
``waiting_since``, which the worker sends with its heartbeats:
``streamctl status`` shows ``waiting: redis://... unreachable since 3.2 s``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["BACKOFF_INITIAL_S", "BACKOFF_MAX_S", "Backoff", "Outage", "retry"]

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.05  # first delay before a retry
BACKOFF_MAX_S = 2.0  # the delay doubles up to this

T = TypeVar("T")


class Backoff:
    """Exponential delays, capped, with jitter: ``next()`` is the next delay."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_MAX_S):
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        d = self._next
        self._next = min(self.cap, self._next * 2)
        return random.uniform(d / 2, d)

    def reset(self) -> None:
        self._next = self.initial


class Outage:
    """The reachability of one server for one PE instance (see the module docstring)."""

    def __init__(
        self,
        ctx: Any,
        server: str,
        backoff: Backoff | None = None,
    ) -> None:
        self.ctx = ctx
        self.server = server
        self.backoff = backoff or Backoff()
        self.since: float | None = None
        self.retries = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def _who(self) -> str:
        c = self.ctx
        return (
            f"app {getattr(c, 'app', '?')!r} PE {getattr(c, 'pe', '?')!r} "
            f"instance {getattr(c, 'instance', '?')}"
        )

    def failed(self, exc: BaseException) -> None:
        """A call failed because the server is unreachable."""
        self.retries += 1
        if self.since is not None:
            return
        self.since = time.monotonic()
        log.warning(
            "%s: %s unreachable (%s: %s); waiting for it, retrying with backoff up to %.1f s",
            self._who(),
            self.server,
            type(exc).__name__,
            " ".join(str(exc).split())[:200],
            self.backoff.cap,
        )
        _set(self.ctx, "waiting", f"{self.server} unreachable")
        _set(self.ctx, "waiting_since", self.since)

    def ok(self) -> None:
        """A call succeeded: the outage (if any) is over."""
        if self.since is None:
            return
        log.warning(
            "%s: %s reachable again after %.1f s (%d retries)",
            self._who(),
            self.server,
            time.monotonic() - self.since,
            self.retries,
        )
        self.since = None
        self.retries = 0
        self.backoff.reset()
        _set(self.ctx, "waiting", "")
        _set(self.ctx, "waiting_since", 0.0)

    async def pause(self) -> None:
        """Sleep the next backoff delay."""
        await asyncio.sleep(self.backoff.next())


def _set(ctx: Any, name: str, value: Any) -> None:
    try:
        setattr(ctx, name, value)
    except AttributeError:  # a context without the field: status only misses it
        pass


async def retry(
    call: Callable[[], T],
    outage: Outage,
    transient: Callable[[BaseException], bool],
    in_thread: bool = True,
) -> T:
    """``call()`` until it returns, waiting out errors that ``transient`` says mean
    the server is unreachable; any other error is raised. A blocking ``call`` runs
    in a thread (``in_thread``), so the worker's event loop goes on meanwhile."""
    while True:
        try:
            result = await asyncio.to_thread(call) if in_thread else call()
        except Exception as e:
            if not transient(e):
                raise
            outage.failed(e)
            await outage.pause()
            continue
        outage.ok()
        return result

