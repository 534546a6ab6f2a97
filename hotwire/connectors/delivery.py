"""The reader shared by sources that keep a delivery log in their server.

The Redis Streams and NATS JetStream sources append every entry handed to them
to a per-instance delivery log in the server before they emit it; the source's
checkpointed position (records emitted) is an index into that log. This module
holds what they share: the iterator loop, the re-emission of the log from the
position after a (re)connection, acks when a checkpoint completes, and waiting
out an unreachable server. A subclass supplies the server's side as hooks.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from hotwire.connectors.outage import Outage

__all__ = ["DeliveryLogReader"]

log = logging.getLogger(__name__)


class DeliveryLogReader:
    """One source instance's async iterator over a server with a delivery log.

    The runtime calls :meth:`checkpoint_complete` when a checkpoint covering
    ``position`` records is stored; the acks run in the iterator's own task, before
    its next read. Hooks, all coroutines but :meth:`transient`:

    * :meth:`open`: connect; return the ids of the log from index ``log_index``
      on, to re-emit before reading anything new (``log_index`` is the position
      minus the entries already acked and dropped from the log);
    * :meth:`fetch`: the records of some of those ids, in order (an id that is
      gone is skipped with a warning);
    * :meth:`read`: new records, appended to the log before they are returned
      (an empty list when there is nothing new, after waiting a little);
    * :meth:`ack`: ack and drop the log's entries before position ``position``
      (called after each complete checkpoint, also at position 0: a checkpoint of
      the instance is complete, which a rescaled source waits for);
    * :meth:`close`: drop the connection (also after an error).

    While :meth:`transient` says an error means the server is unreachable, the
    reader waits with backoff and reconnects; on the new connection it re-emits
    the log from its position, so an entry logged by a read whose reply was lost
    is emitted, once.
    """

    def __init__(self, ctx: Any, server: str, batch: int) -> None:
        self.ctx = ctx
        self.batch = batch
        self.position = int(getattr(ctx, "position", 0) or 0)  # records emitted
        # The fencing token: a replacement of this instance has a larger generation.
        self.generation = int(getattr(ctx, "generation", 0) or 0)
        self.outage = Outage(ctx, server)
        self._acked_to = 0  # position up to which a complete checkpoint covers
        self._ack_due = False  # a checkpoint completed since the last ack()
        self._buf: list[Any] = []  # records to emit, last one first
        self._replay: list[Any] = []  # log ids still to re-emit
        self._open = False

    def superseded(self, name: str, why: str) -> NoReturn:
        """A later instance of this source owns the delivery log (``why`` says how
        the server answered): stop, loudly, reading nothing more."""
        msg = (
            f"app {self.ctx.app!r} PE {self.ctx.pe!r} instance {name} (generation "
            f"{self.generation}) was replaced: {why}; it stops (what it read and did not "
            "log goes to the replacement)"
        )
        raise RuntimeError(msg)

    # -- hooks ---------------------------------------------------------------
    async def open(self, position: int) -> list[Any]:
        raise NotImplementedError

    async def fetch(self, ids: list[Any]) -> list[Any]:
        raise NotImplementedError

    async def read(self) -> list[Any]:
        raise NotImplementedError

    async def ack(self, position: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def transient(self, exc: BaseException) -> bool:
        return False

    # -- the iterator ----------------------------------------------------------
    def checkpoint_complete(self, position: int) -> None:
        self._acked_to = max(self._acked_to, position)
        self._ack_due = True

    def __aiter__(self) -> DeliveryLogReader:
        return self

    async def __anext__(self) -> Any:
        while not self._buf:
            try:
                await self._step()
            except Exception as e:
                if not self.transient(e):
                    raise
                self.outage.failed(e)
                await self._drop()
                await self.outage.pause()
                continue
            self.outage.ok()
        self.position += 1
        return self._buf.pop()

    def held(self) -> bool:
        """The worker holds its output (it stood still; the master may have declared
        it dead and started this instance elsewhere, on the same delivery log)."""
        hold = getattr(self.ctx, "hold", None)
        return hold is not None and bool(hold.held())

    async def _step(self) -> None:
        # A worker that was stopped (SIGSTOP, a paused host) may have been replaced
        # meanwhile: a read now would append to the log its replacement emits from,
        # and shift every later position in it. Nothing goes to the server until the
        # master answers that this worker's session is current.
        while self.held():
            await self.ctx.hold.wait()
        if not self._open:
            self._replay = list(await self.open(self.position))
            self._open = True
        if self._ack_due:
            self._ack_due = False  # a checkpoint completing meanwhile sets it again
            try:
                await self.ack(self._acked_to)
            except BaseException:
                self._ack_due = True
                raise
        if self._replay:
            ids, self._replay = self._replay[: self.batch], self._replay[self.batch :]
            records = await self.fetch(ids)
        else:
            records = await self.read()
        records.reverse()
        self._buf = records

    async def _drop(self) -> None:
        self._open, self._buf, self._replay = False, [], []
        self._ack_due = self._ack_due or self._acked_to > 0  # acked again on the new one
        try:
            await self.close()
        except Exception as e:  # closing a dead connection may raise; it is gone anyway
            log.debug("closing a source's connection: %s", e)

    async def aclose(self) -> None:
        """Retiring: acks what a complete checkpoint covers first (a source held back
        by backpressure may not have stepped since), so a rescale that follows finds
        the previous one finished; then drops the connection."""
        if self._ack_due and self._open and not self.held():
            try:
                await self.ack(self._acked_to)
                self._ack_due = False
            except Exception as e:  # the successor acks it after its own checkpoint
                log.warning("a retiring source's ack failed: %s: %s", type(e).__name__, e)
        self._open = False
        await self.close()
