"""One transition at a time per app, without polling.

A client's submit, upgrade or kill takes an app's lock only when it is free
(:meth:`AppLocks.take`): a second upgrade is refused, not queued. Recoveries,
drains and the master's own work wait their turn (:meth:`AppLocks.acquire`), and
the checkpoint that follows a commit waits for the lock to be free
(:meth:`AppLocks.wait_free`); waiters sleep on an event the release sets.
"""

from __future__ import annotations

import asyncio


class AppLocks:
    def __init__(self) -> None:
        self._what: dict[str, str] = {}  # app -> what holds its lock
        self._free: dict[str, asyncio.Event] = {}  # set while the app's lock is free

    def __contains__(self, app: object) -> bool:
        return app in self._what

    def holder(self, app: str) -> str:
        """What holds ``app``'s lock ("" when free), for errors and status."""
        return self._what.get(app, "")

    def take(self, app: str, what: str) -> bool:
        """Take ``app``'s lock if it is free; never waits."""
        if app in self._what:
            return False
        self._what[app] = what
        ev = self._free.get(app)
        if ev is not None:
            ev.clear()
        return True

    async def acquire(self, app: str, what: str) -> None:
        """Take ``app``'s lock, waiting for it to be free."""
        while not self.take(app, what):
            await self._event(app).wait()

    def release(self, app: str) -> None:
        self._what.pop(app, None)
        ev = self._free.get(app)
        if ev is not None:
            ev.set()

    async def wait_free(self, app: str) -> None:
        """Return once ``app``'s lock is free (without taking it)."""
        while app in self._what:
            await self._event(app).wait()

    def _event(self, app: str) -> asyncio.Event:
        ev = self._free.get(app)
        if ev is None:
            ev = self._free[app] = asyncio.Event()
            if app not in self._what:
                ev.set()
        return ev
