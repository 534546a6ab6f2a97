"""NATS JetStream: an exactly-once source (durable pull consumer) and sink (Nats-Msg-Id).

::

    from hotwire.connectors.nats_js import JetStreamSink, JetStreamSource

    src = app.source("src", JetStreamSource(url="nats://localhost:4222", stream="IN"))
    ...
    out.sink("out", JetStreamSink(url="nats://localhost:4222", subject="out.counts"))

The source pulls from the durable consumer ``hotwire_<app>_<pe>`` of ``stream``
(created with explicit acks if it does not exist; every instance of the PE
shares it) and emits ``{"seq": <stream sequence>, "subject": ..., "data": bytes,
"headers": {...}}``. Each fetched batch's stream sequences are appended to a
per-instance *delivery log* in the KV bucket ``hotwire_sources`` before the
batch is emitted, so the source's checkpointed position (records emitted) is an
index into that log. A message is acked only when a checkpoint covering it is
complete. After a restart or an online upgrade the source re-emits the log from
its position (reading the messages by sequence); a redelivery of a message that
is in the log is not emitted again, only acked once a checkpoint covers it.

Limit: the source's parallelism is 1 (a redelivery of a message logged by
another instance could not be told from a new one); a larger one is refused.
A message delivered and not acked by a crashed instance is redelivered after
``ack_wait`` seconds, and only then acked (``num_ack_pending`` stays above zero
until then).

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
from typing import Any, ClassVar
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


def consumer_name(app: str, pe: str) -> str:
    """The durable consumer a :class:`JetStreamSource` PE pulls from."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"hotwire_{app}_{pe}")


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
        if getattr(ctx, "parallelism", 1) != 1:
            msg = (
                f"app {ctx.app!r} PE {ctx.pe!r}: JetStreamSource runs with parallelism 1, "
                f"not {ctx.parallelism}"
            )
            raise ValueError(msg)
        return _Reader(self, ctx)


class _Reader(DeliveryLogReader):
    """One source instance's async iterator (see the module docstring and
    :class:`hotwire.connectors.delivery.DeliveryLogReader`)."""

    def __init__(self, conf: JetStreamSource, ctx: Any) -> None:
        super().__init__(ctx, str(conf.url), conf.batch)
        self.conf = conf
        self.durable = consumer_name(ctx.app, ctx.pe)
        self.key = re.sub(r"[^A-Za-z0-9_=./-]", "_", f"{ctx.app}.{ctx.pe}.{ctx.instance}")
        self.base = 0  # log entries dropped (acked) before seqs[0]
        self.seqs: list[int] = []  # the delivery log: stream sequences, in emit order
        self.logged: set[int] = set()
        self.msgs: dict[int, Any] = {}  # the latest delivery of a logged sequence
        # Acked by position: each delivery is acked as it comes, and a seq is kept
        # until the consumer's ack floor has passed it, so a redelivery already on its
        # way when the ack went out is recognised, not emitted again.
        self.covered: set[int] = set()
        self._floor = 0  # the consumer's ack floor seen at the previous ack()
        self._nc: Any = None
        self._loaded = False  # the log was read from the server (or started empty)

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
        try:
            await self.js.consumer_info(self.conf.stream, self.durable)
        except NotFoundError:
            if resumed:
                raise _NotReady(f"consumer {self.durable!r} not found") from None
            await self.js.add_consumer(
                self.conf.stream,
                api.ConsumerConfig(
                    durable_name=self.durable,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=self.conf.ack_wait,
                    max_ack_pending=-1,
                ),
            )
        self.sub = await self.js.pull_subscribe_bind(self.durable, self.conf.stream)
        if self._loaded:
            await self._save()  # this reader's log is the truth; a put in doubt is redone
        else:
            try:
                saved = json.loads((await self.kv.get(self.key)).value or b"{}")
            except KeyNotFoundError:
                if position > 0:  # an earlier generation emitted, so it logged
                    raise _NotReady(f"delivery log {self.key!r} not found") from None
                saved = {}
            self.base, self.seqs = int(saved.get("base", 0)), list(saved.get("seqs", []))
            self.covered |= set(saved.get("covered", []))
            self._loaded = True
        self.logged = set(self.seqs)
        # Deliveries to an earlier connection cannot be acked on this one: the server
        # delivers them again (after ack_wait), and those are kept or acked then.
        self.msgs = {}
        return self.seqs[max(0, position - self.base) :]

    async def _save(self) -> None:
        doc = {"base": self.base, "seqs": self.seqs, "covered": sorted(self.covered)}
        await self.kv.put(self.key, json.dumps(doc).encode())

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
            if seq in self.covered:
                await m.ack()
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
        # Seqs under the floor seen one round ago are never delivered again: a
        # redelivery sent before its ack came in has been fetched since.
        floor, self._floor = self._floor, await self._ack_floor()
        self.covered = {seq for seq in self.covered if seq > floor}

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
    """Whether ``exc`` means the NATS server is away or JetStream not ready (yet)."""
    from nats import errors

    return isinstance(
        exc,
        TimeoutError
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
