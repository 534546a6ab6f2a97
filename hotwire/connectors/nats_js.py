"""NATS JetStream: an exactly-once source (durable pull consumer) and sink (Nats-Msg-Id).

::

    from hotwire.connectors.nats_js import JetStreamSink, JetStreamSource

    src = app.source("src", JetStreamSource(url="nats://localhost:4222", stream="IN"))
    ...
    out.sink("out", JetStreamSink(url="nats://localhost:4222", subject="out.counts"))

The source pulls from a durable consumer of ``stream`` (explicit acks), one per
instance: ``hotwire_<app>_<pe>`` at parallelism 1, ``hotwire_<app>_<pe>_<i>_of_<n>``
otherwise; each instance reads the whole stream through its own consumer, emits
the messages it owns (stream sequence ``% n == i``) and acks the others at once.
It emits ``{"seq": <stream sequence>, "subject": ..., "data": bytes, "headers":
{...}}``. Each fetched batch's stream sequences are appended to a per-instance
*delivery log* in the KV bucket ``hotwire_sources`` before the batch is emitted,
so the source's checkpointed position (records emitted) is an index into that log.
A message is acked only when a checkpoint covering it is complete. After a restart
or an online upgrade the source re-emits the log from its position (reading the
messages by sequence); a redelivery of a message that is in the log is not emitted
again, only acked once a checkpoint covers it; nor is one at or under the highest
ack floor the consumer has reported (kept in the log), as a nats-server that was
killed delivers again what it acked last (it writes acks to disk a little later).
A consumer per instance keeps every redelivery within the instance that logged
the message (a shared consumer redelivers to any instance, which could not tell a
message another instance emitted from a new one).

A rescale (another parallelism) starts new consumers at the lowest sequence an
old instance may not have emitted (one past the lowest of the old consumers' ack
floors) and skips what the old instances emitted above their floors (their logs up
to their handed-over positions); the old consumers and logs are deleted at the
first complete checkpoint once every new instance has read them. A restart before
that checkpoint starts the new consumers afresh (at the new parallelism) or deletes
them (at the old one); a second rescale before it is refused.

Fencing. The log carries the generation of the instance that wrote it
(``Context.generation``; a replacement always has a larger one) and every write is
conditional on the KV revision this instance last read or wrote. A restored
instance claims its log when it opens (a fresh start, with no state taken over,
claims it whatever generation wrote it: a master with a new store counts from 1),
so once its replacement opened, an instance still running on a worker cut off
from the master fails its next write and stops with an error, its batch neither
emitted nor acked (the server delivers it again, after ``ack_wait``, to the
replacement). The logs a rescale takes over are not
fenced that way.

Limit: a message delivered and not acked by a crashed instance is redelivered
after ``ack_wait`` seconds, and only then acked (``num_ack_pending`` stays above
zero until then).

The sink is a :class:`hotwire.sinks.TransactionalSink`: pre-commit keeps the
transaction's records in the checkpoint (the handle), commit publishes them to
JetStream with ``Nats-Msg-Id: <transaction>-<index>``, so a re-commit within the
stream's duplicate window (default 2 minutes) adds nothing. A commit that fails
because the server is away is retried with backoff (the sink's instance waits;
``hotwire.connectors.outage``). The source relies on the client's own
reconnection; it does not report itself as waiting.

Options are checked when the app is loaded: a missing stream or subject, a URL
that is not ``nats://``/``tls://`` or an unknown option raises ValueError.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from typing import Any, ClassVar, NoReturn
from urllib.parse import urlparse

from hotwire.connectors.base import check_typed_options
from hotwire.connectors.delivery import DeliveryLogReader
from hotwire.sinks import TransactionalSink

__all__ = ["JetStreamSink", "JetStreamSource", "consumer_name"]

log = logging.getLogger(__name__)

_SCHEMES = ("nats", "tls")
_BUCKET = "hotwire_sources"


def _check_options(who: str, given: dict[str, Any], allowed: dict[str, Any]) -> None:
    check_typed_options(who, given, allowed)
    url = given.get("url")
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in _SCHEMES or not parsed.hostname:
        msg = f"{who}: url={url!r} is not a NATS URL; give nats://HOST:PORT (or tls://)"
        raise ValueError(msg)


def _required(who: str, given: dict[str, Any], name: str) -> str:
    v = given.get(name)
    if not isinstance(v, str) or not v:
        msg = f"{who}: the {name} name is missing; give {name}='NAME'"
        raise ValueError(msg)
    return v


def consumer_name(app: str, pe: str, instance: int = 0, parallelism: int = 1) -> str:
    """The durable consumer instance ``instance`` of a :class:`JetStreamSource` PE
    with ``parallelism`` instances pulls from (at parallelism 1 the PE's name alone)."""
    tail = "" if parallelism == 1 else f"_{instance}_of_{parallelism}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"hotwire_{app}_{pe}") + tail


def log_key(app: str, pe: str, instance: int = 0, parallelism: int = 1) -> str:
    """The key of an instance's delivery log in the KV bucket ``hotwire_sources``."""
    tail = "" if parallelism == 1 else f"-of-{parallelism}"
    return re.sub(r"[^A-Za-z0-9_=./-]", "_", f"{app}.{pe}.{instance}") + tail


class JetStreamSource:
    """A source reading JetStream stream ``stream`` exactly once (module docstring).

    Options: ``url``, ``stream`` (required); ``batch`` (messages per fetch, default
    256); ``ack_wait`` (seconds before JetStream redelivers an unacked message,
    for a new consumer; default 30).
    """

    _OPTIONS: ClassVar[dict[str, Any]] = {
        "url": str,
        "stream": str,
        "batch": int,
        "ack_wait": (int, float),
    }

    def __init__(self, **options: Any) -> None:
        who = "JetStreamSource"
        _check_options(who, options, self._OPTIONS)
        self.url = options["url"]
        self.stream = _required(who, options, "stream")
        self.batch = int(options.get("batch", 256))
        self.ack_wait = float(options.get("ack_wait", 30))
        if self.batch < 1:
            msg = f"{who}: batch={self.batch} must be at least 1"
            raise ValueError(msg)

    def __call__(self, ctx: Any) -> _Reader:
        return _Reader(self, ctx)

    def check_server(self) -> None:
        """Raise the server's error if it cannot be reached: a submit or an upgrade
        that starts this source is refused with it (a restart waits instead)."""
        import nats

        async def ping() -> None:
            # nats.connect() retries a refused first connection by itself: the first
            # error it reports is the answer.
            failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

            async def on_error(e: Exception) -> None:
                if not failed.done():
                    failed.set_result(e)

            connect = asyncio.ensure_future(
                nats.connect(
                    self.url,
                    allow_reconnect=False,
                    connect_timeout=5,
                    max_reconnect_attempts=0,
                    error_cb=on_error,
                )
            )
            done, _ = await asyncio.wait(
                {connect, failed}, timeout=10, return_when="FIRST_COMPLETED"
            )
            if connect in done and connect.exception() is None:
                await connect.result().close()
                return
            connect.cancel()
            await asyncio.gather(connect, return_exceptions=True)
            why = failed.result() if failed.done() else "no answer within 10 s"
            raise ConnectionError(f"cannot connect to {self.url}: {why}")

        asyncio.run(ping())


class _Reader(DeliveryLogReader):
    """One source instance's async iterator (see the module docstring and
    :class:`hotwire.connectors.delivery.DeliveryLogReader`)."""

    def __init__(self, conf: JetStreamSource, ctx: Any) -> None:
        super().__init__(ctx, str(conf.url), conf.batch)
        self.conf = conf
        self.n = int(getattr(ctx, "parallelism", 1) or 1)
        self.me = int(ctx.instance)
        self.durable = consumer_name(ctx.app, ctx.pe, self.me, self.n)
        self.key = log_key(ctx.app, ctx.pe, self.me, self.n)
        # A rescale's state until this instance's first complete checkpoint: the old
        # instances' consumers and logs it took over (deleted then).
        self.rescaled: dict[str, Any] | None = None
        # What the old instances emitted (messages this instance's consumer skips):
        # per old instance j, its consumer's ack floor and the seqs above it it emitted.
        self.old: dict[str, Any] | None = None
        self._old_sets: list[set[int]] = []
        self.base = 0  # log entries dropped (acked) before seqs[0]
        self.seqs: list[int] = []  # the delivery log: stream sequences, in emit order
        self.logged: set[int] = set()
        self.msgs: dict[int, Any] = {}  # the latest delivery of a logged sequence
        # Acked by position: each delivery is acked as it comes, and a seq is kept
        # until the consumer's ack floor has passed it, so a redelivery already on its
        # way when the ack went out is recognised, not emitted again.
        self.covered: set[int] = set()
        # The highest ack floor the consumer has reported, kept in the log: every
        # sequence at or under it was acked. A server killed loses the last acks it
        # took (it writes them to disk a little later) and delivers those messages
        # again; they are acked, never emitted again.
        self.floor = 0
        self._nc: Any = None
        self._loaded = False  # the log was read from the server (or started empty)
        # The log's KV revision this instance last read or wrote (0: it has none);
        # its writes are conditional on it. None: not known, a write is unconditional.
        self.rev: int | None = None

    async def open(self, position: int) -> list[Any]:
        import nats
        from nats.js import api
        from nats.js.errors import KeyNotFoundError, NotFoundError

        # Once this reader has its log, a reconnection keeps it: what the server
        # answers right after a restart (a bucket, consumer or entry "not found"
        # while it still loads them) must not pass for an empty log or a new
        # consumer, which would emit again everything not yet acked.
        resumed = self._loaded or position > 0
        nc = self._nc = await nats.connect(self.conf.url, allow_reconnect=False, error_cb=_quiet)
        self.js = nc.jetstream()
        try:
            self.kv = await self.js.key_value(_BUCKET)
        except NotFoundError:
            if resumed:
                raise _NotReady(f"bucket {_BUCKET!r} not found") from None
            self.kv = await self.js.create_key_value(bucket=_BUCKET, history=1)
        preds = list(getattr(self.ctx, "predecessors", None) or ())
        fresh = False
        if not self._loaded and any(int(p["of"]) != self.n for p in preds):
            await self._rescale(position, preds)
        else:
            if not self._loaded and preds and self.me == 0:
                await self._drop_abandoned()
            try:
                await self.js.consumer_info(self.conf.stream, self.durable)
            except NotFoundError:
                if resumed:
                    raise _NotReady(f"consumer {self.durable!r} not found") from None
                # Restored at position 0 after a rescale it never read in: skip what
                # the old instances emitted, as its siblings do.
                self.old = await self._siblings_old() if preds else None
                self._old_sets = [set(e) for e in (self.old or {}).get("emitted", [])]
                start = min(self.old["floors"]) + 1 if self.old else 0
                await self._add_consumer(api, start)
                fresh = True  # a new consumer: a log left by another app's is not its
                if self.old is not None:
                    await self._save()
                    self._loaded = True
        self.sub = await self.js.pull_subscribe_bind(self.durable, self.conf.stream)
        if self._loaded:
            await self._save()  # this reader's log is the truth; a put in doubt is redone
        else:
            try:
                entry = await self.kv.get(self.key)
                saved, rev = json.loads(entry.value or b"{}"), int(entry.revision or 0)
            except KeyNotFoundError:
                if position > 0:  # an earlier generation emitted, so it logged
                    raise _NotReady(f"delivery log {self.key!r} not found") from None
                saved, rev = {}, 0
            # A fresh start (no state taken over: a new app, or a master with a new
            # store, counts generations from 1 again) claims the log whatever wrote it.
            if int(saved.get("gen", -1)) > self.generation and (preds or position > 0):
                self._superseded(int(saved["gen"]))
            self.base, self.seqs = int(saved.get("base", 0)), list(saved.get("seqs", []))
            self.covered |= set(saved.get("covered", []))
            if not fresh:
                self.floor = max(self.floor, int(saved.get("floor", 0)))
            self.rescaled, self.old = saved.get("rescaled"), saved.get("old")
            self._old_sets = [set(e) for e in (self.old or {}).get("emitted", [])]
            self._loaded = True
            if saved.get("gen") != self.generation:  # claim it: an older instance writes no more
                self.rev = rev
                await self._save()
        self.logged = set(self.seqs)
        # Deliveries to an earlier connection cannot be acked on this one: the server
        # delivers them again (after ack_wait), and those are kept or acked then.
        self.msgs = {}
        return self.seqs[max(0, position - self.base) :]

    async def _save(self) -> None:
        doc: dict[str, Any] = {
            "base": self.base,
            "seqs": self.seqs,
            "covered": sorted(self.covered),
            "floor": self.floor,
        }
        if self.rescaled is not None:
            doc["rescaled"] = self.rescaled
        if self.old is not None:
            doc["old"] = self.old
        doc["gen"] = self.generation
        data = json.dumps(doc).encode()
        if self.rev is None:
            self.rev = await self.kv.put(self.key, data)
            return
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        for _ in range(3):
            try:
                if self.rev == 0:
                    self.rev = await self.kv.create(self.key, data)
                else:
                    self.rev = await self.kv.update(self.key, data, last=self.rev)
                return
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.kv.get(self.key)
            except KeyNotFoundError:
                if self.rev:  # deleted: a rescale's first checkpoint took it over
                    self._superseded(None)
                continue
            other = int(json.loads(entry.value or b"{}").get("gen", -1))
            if other > self.generation:
                self._superseded(other)
            if other < self.generation:
                # An older instance wrote after this one read the log, before its
                # claim: read the log again (its entries are to be emitted from it).
                self._loaded, self.rev = False, None
                raise _NotReady(f"delivery log {self.key!r} changed while it was read")
            self.rev = int(entry.revision)  # this instance's own write, its answer lost
        raise _NotReady(f"delivery log {self.key!r}: a conditional write kept failing")

    def _superseded(self, other: int | None) -> NoReturn:
        by = "was deleted" if other is None else f"is owned by generation {other}"
        self.superseded(f"{self.me} of {self.n}", f"its delivery log {self.key!r} {by}")

    async def _add_consumer(self, api: Any, start: int) -> None:
        """Create this instance's durable consumer, reading from stream sequence
        ``start`` (0: from the first message)."""
        config = api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.conf.ack_wait,
            max_ack_pending=-1,
        )
        if start > 1:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start
        await self.js.add_consumer(self.conf.stream, config)

    def _mine(self, seq: int) -> bool:
        """Whether this instance emits message ``seq``: it owns it (``seq % n``) and
        no instance of the parallelism before a rescale emitted it."""
        if seq % self.n != self.me:
            return False
        old = self.old
        if old is None:
            return True
        j = seq % int(old["of"])
        return not (seq <= old["floors"][j] or seq in self._old_sets[j])

    async def _rescale(self, position: int, preds: list[dict[str, Any]]) -> None:
        """Start at another parallelism: a new consumer from the lowest sequence an
        old instance may not have emitted, skipping what the old instances emitted
        (their consumers' ack floors and logs up to their handed-over positions).
        The old consumers and logs this instance takes over (``j % n == me``) stay
        until its first complete checkpoint (a restart from an older checkpoint
        reads them again), then are deleted."""
        from nats.js import api
        from nats.js.errors import KeyNotFoundError, NotFoundError

        m = int(preds[0]["of"])
        floors, emitted = [0] * m, [[] for _ in range(m)]
        for p in preds:
            j, pos = int(p["instance"]), int(p["position"])
            key = log_key(self.ctx.app, self.ctx.pe, j, m)
            try:
                doc = json.loads((await self.kv.get(key)).value or b"{}")
            except KeyNotFoundError:
                if pos > 0:
                    raise _NotReady(f"delivery log {key!r} not found") from None
                doc = {}
            if doc.get("rescaled"):
                msg = (
                    f"app {self.ctx.app!r} PE {self.ctx.pe!r}: the JetStream source cannot "
                    f"go from {m} to {self.n} instances: the rescale to {m} instances has no "
                    f"complete checkpoint yet (its messages would be read twice or lost); "
                    f"upgrade to {m} instances, let a checkpoint complete, then rescale"
                )
                raise RuntimeError(msg)
            name = consumer_name(self.ctx.app, self.ctx.pe, j, m)
            try:
                info = await self.js.consumer_info(self.conf.stream, name)
                floors[j] = int(info.ack_floor.stream_seq or 0)
            except NotFoundError:
                if pos > 0:
                    raise _NotReady(f"consumer {name!r} not found") from None
            # A server that was killed may have lost the last acks it took: the
            # floor the old instance logged counts too.
            floors[j] = max(floors[j], int(doc.get("floor", 0)))
            base, seqs = int(doc.get("base", 0)), list(doc.get("seqs", []))
            done = set(doc.get("covered", [])) | set(seqs[: max(0, pos - base)])
            emitted[j] = sorted(s for s in done if s > floors[j])
        try:  # an earlier attempt of this rescale (or a stale one): start afresh
            await self.js.delete_consumer(self.conf.stream, self.durable)
        except NotFoundError:
            pass
        taken = [int(p["instance"]) for p in preds if int(p["instance"]) % self.n == self.me]
        sig = json.dumps(sorted([int(p["instance"]), int(p["position"])] for p in preds))
        self.rescaled = {
            "of": m,
            "sig": sig,
            "consumers": [consumer_name(self.ctx.app, self.ctx.pe, j, m) for j in taken],
            "logs": [log_key(self.ctx.app, self.ctx.pe, j, m) for j in taken],
        }
        self.old = {"of": m, "sig": sig, "floors": floors, "emitted": emitted}
        self._old_sets = [set(e) for e in emitted]
        self.base, self.seqs, self.covered = position, [], set()
        await self._save()
        await self._add_consumer(api, min(floors) + 1)
        self._loaded = True
        log.info(
            "app %r PE %r instance %d: rescaled from %d instances; reads from sequence %d, "
            "skipping %d messages the old instances emitted above their ack floors",
            self.ctx.app,
            self.ctx.pe,
            self.me,
            m,
            min(floors) + 1,
            sum(len(e) for e in emitted),
        )

    async def _siblings_old(self) -> dict[str, Any] | None:
        """What the old instances of the last rescale emitted, from another instance's
        log (the same for every instance of that rescale)."""
        from nats.js.errors import KeyNotFoundError

        for k in range(self.n):
            if k == self.me:
                continue
            try:
                entry = await self.kv.get(log_key(self.ctx.app, self.ctx.pe, k, self.n))
            except KeyNotFoundError:
                continue
            old = json.loads(entry.value or b"{}").get("old")
            if old is not None:
                return old  # type: ignore[no-any-return]
        return None

    async def _drop_abandoned(self) -> None:
        """Restored at parallelism n: the consumers and logs of a rescale away from n
        that no checkpoint covers (the app went back to its checkpoint) are deleted;
        the old consumers read on from where they were."""
        from nats.js.errors import KeyNotFoundError, NotFoundError

        prefix = consumer_name(self.ctx.app, self.ctx.pe)
        for info in await self.js.consumers_info(self.conf.stream):
            name = info.name
            found = re.fullmatch(re.escape(prefix) + r"(?:_(\d+)_of_(\d+))?", name)
            if found is None or name == self.durable:
                continue
            j, k = int(found.group(1) or 0), int(found.group(2) or 1)
            if k == self.n:
                continue
            key = log_key(self.ctx.app, self.ctx.pe, j, k)
            try:
                doc = json.loads((await self.kv.get(key)).value or b"{}")
            except KeyNotFoundError:
                continue
            if (doc.get("rescaled") or {}).get("of") != self.n:
                continue
            log.warning(
                "app %r PE %r: deleting consumer %r of a rescale from %d to %d instances "
                "that no checkpoint covers",
                self.ctx.app,
                self.ctx.pe,
                name,
                self.n,
                k,
            )
            try:
                await self.js.delete_consumer(self.conf.stream, name)
            except NotFoundError:
                pass
            await self.kv.delete(key)

    def transient(self, exc: BaseException) -> bool:
        return _transient(exc)

    async def read(self) -> list[Any]:
        from nats.errors import TimeoutError as NatsTimeout

        try:
            msgs = await self.sub.fetch(self.conf.batch, timeout=0.2)
        except NatsTimeout:
            return []
        new = []
        for m in msgs:
            seq = m.metadata.sequence.stream
            if seq <= self.floor or seq in self.covered or not self._mine(seq):
                await m.ack()  # acked before, or another instance's (own consumer)
            elif seq in self.logged:
                self.msgs[seq] = m  # a redelivery: not emitted again
            else:
                new.append(m)
                self.msgs[seq] = m
        if not new:
            return []
        for m in new:
            seq = m.metadata.sequence.stream
            self.seqs.append(seq)
            self.logged.add(seq)
        await self._save()  # logged before emitted
        return [_record(m.metadata.sequence.stream, m.subject, m.data, m.headers) for m in new]

    async def fetch(self, ids: list[Any]) -> list[Any]:
        from nats.js.errors import NotFoundError

        out = []
        for seq in ids:
            try:
                raw = await self.js.get_msg(self.conf.stream, seq)
            except NotFoundError:
                log.warning(
                    "app %r PE %r: message %d of stream %r is gone; skipped",
                    self.ctx.app,
                    self.ctx.pe,
                    seq,
                    self.conf.stream,
                )
                continue
            out.append(_record(seq, raw.subject, raw.data, raw.headers))
        return out

    async def ack(self, position: int) -> None:
        if self.rescaled is not None:
            await self._finish_rescale()
        n = position - self.base
        if n <= 0:
            return
        done, self.seqs = self.seqs[:n], self.seqs[n:]
        self.base += len(done)
        for seq in done:
            self.logged.discard(seq)
            self.covered.add(seq)  # acked by position: acked below and when delivered again
        await self._save()  # before the acks: a lost connection midway loses nothing
        for seq in done:
            m = self.msgs.pop(seq, None)
            if m is not None:
                await m.ack()
        # A redelivery of a seq at or under the floor is acked when it comes.
        floor = await self._ack_floor()
        if floor > self.floor:
            self.floor = floor
            self.covered = {seq for seq in self.covered if seq > floor}
            await self._save()

    async def _finish_rescale(self) -> None:
        """A checkpoint of this instance is complete: no restart goes back to the
        parallelism before the rescale, so the old consumers (with what they
        delivered and the old instances emitted) and logs it took over go."""
        from nats.js.errors import KeyNotFoundError, NotFoundError

        assert self.rescaled is not None
        # Every new instance reads all old logs and floors when it starts: they go
        # only once each of them has (an instance may start after a checkpoint).
        for k in range(self.n):
            if k == self.me:
                continue
            try:
                doc = json.loads(
                    (await self.kv.get(log_key(self.ctx.app, self.ctx.pe, k, self.n))).value
                    or b"{}"
                )
            except KeyNotFoundError:
                return
            if (doc.get("old") or {}).get("sig") != self.rescaled["sig"]:
                return
        for name in self.rescaled["consumers"]:
            try:
                await self.js.delete_consumer(self.conf.stream, name)
            except NotFoundError:
                pass
        for key in self.rescaled["logs"]:
            await self.kv.delete(key)
        self.rescaled = None
        await self._save()

    async def _ack_floor(self) -> int:
        info = await self.js.consumer_info(self.conf.stream, self.durable)
        return int(info.ack_floor.stream_seq or 0)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.close()


class _NotReady(ConnectionError):
    """The server answers but does not have (yet) what a resumed source needs: retried
    as an outage, never read as absent."""


async def _quiet(e: Exception) -> None:
    """The NATS client's error callback: its default logs every failed reconnection
    with a traceback; the connectors log an outage once (hotwire.connectors.outage)."""
    log.debug("nats client: %s: %s", type(e).__name__, e)


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` means the NATS server is away or JetStream not ready (yet).

    Right after a restart JetStream answers publishes with "no response from
    stream" and API calls with 503 until it has loaded its streams: both pass."""
    from nats import errors
    from nats.js import errors as js_errors

    return isinstance(
        exc,
        js_errors.NoStreamResponseError
        | js_errors.ServiceUnavailableError
        | TimeoutError
        | OSError
        | errors.ConnectionClosedError
        | errors.ConnectionReconnectingError
        | errors.NoRespondersError
        | errors.NoServersError
        | errors.StaleConnectionError
        | errors.OutboundBufferLimitError
        | errors.UnexpectedEOF,
    )


def _record(seq: int, subject: str | None, data: bytes | None, headers: Any) -> dict[str, Any]:
    return {"seq": seq, "subject": subject, "data": data or b"", "headers": dict(headers or {})}


class _Loop:
    """An event loop on a thread of its own, for a sink whose methods are synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class JetStreamSink(TransactionalSink):
    """An exactly-once sink publishing to JetStream subject ``subject`` (module docstring).

    ``JetStreamSink(url=..., subject=...)`` returns a sink class bound to those
    options. A record that is bytes is the payload; any other is sent as JSON.
    """

    _OPTIONS: ClassVar[dict[str, Any]] = {"url": str, "subject": str}
    options: ClassVar[dict[str, Any]] = {}

    def __new__(cls, **options: Any) -> Any:
        if not options:
            return super().__new__(cls)  # the runtime making a sink object
        who = "JetStreamSink"
        _check_options(who, options, cls._OPTIONS)
        _required(who, options, "subject")
        return type(cls.__name__, (cls,), {"options": dict(options), "__module__": cls.__module__})

    def __init__(self, **options: Any) -> None:
        pass

    def setup(self, ctx: Any) -> None:
        import nats

        if not self.options:
            msg = (
                f"PE {getattr(ctx, 'pe', '?')!r}: use JetStreamSink(url=..., subject=...) "
                "as the sink, not the bare class"
            )
            raise ValueError(msg)
        self.subject = self.options["subject"]
        self._loop = _Loop()
        self.nc = self._loop.run(nats.connect(self.options["url"], error_cb=_quiet))
        self.js = self.nc.jetstream()
        self._txn = ""
        self._recs: list[bytes] = []

    def begin(self, txn: str) -> None:
        self._txn, self._recs = txn, []

    def write(self, record: Any) -> None:
        self._recs.append(record if isinstance(record, bytes) else json.dumps(record).encode())

    def pre_commit(self) -> Any:
        if not self._recs:
            return None
        handle = [self._txn, self._recs]
        self._recs = []
        return handle

    def server(self) -> str:
        return str(self.options.get("url", "the NATS server"))

    def is_transient(self, exc: BaseException) -> bool:
        """The server is away or JetStream not ready (yet): the commit is retried, and
        the messages' ids make a retry add nothing that was published already."""
        return _transient(exc)

    def commit(self, handle: Any) -> None:
        txn, recs = handle
        if self.nc.is_closed:  # the client gave up reconnecting: a new connection
            import nats

            self.nc = self._loop.run(nats.connect(self.options["url"], error_cb=_quiet))
            self.js = self.nc.jetstream()
        self._loop.run(self._publish(str(txn), list(recs)), timeout=120)

    async def _publish(self, txn: str, recs: list[bytes]) -> None:
        acks = [
            await self.js.publish(self.subject, r, headers={"Nats-Msg-Id": f"{txn}-{i}"})
            for i, r in enumerate(recs)
        ]
        del acks

    def abort(self) -> None:
        self._recs = []

    def teardown(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            try:
                loop.run(self.nc.close(), timeout=5)
            finally:
                loop.close()
