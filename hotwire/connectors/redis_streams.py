"""Redis Streams: an exactly-once source (consumer groups) and sink (XADD at commit).

Source::

    from hotwire.connectors.redis_streams import RedisStreamSink, RedisStreamSource

    src = app.source("src", RedisStreamSource(url="redis://localhost:6379/0", stream="in"))
    ...
    out.sink("out", RedisStreamSink(url="redis://localhost:6379/0", stream="out"))

The source reads with ``XREADGROUP`` in the consumer group ``hotwire.<app>.<pe>``
(one consumer per source instance, named ``<index>-of-<parallelism>``) and emits one record per
entry: ``{"id": "<entry id>", "fields": {field: value}}``. Every entry it is
handed goes, in the same transaction (``MULTI``/``EXEC``: the read between two
Lua calls, see ``_MARK``), at the end of a per-instance *delivery log*
(a Redis list): the source's checkpointed position ``n`` (records emitted) is
then the index in that log of the first entry not yet covered. The entries are
acknowledged (``XACK``) and dropped from the log only when a checkpoint that
covers them is complete. After a restart (recovery or an online upgrade of the
source) the source re-emits the log from its position, in the order first
emitted, then reads new entries: nothing is re-read that a complete checkpoint
covers and nothing delivered is skipped. After a full batch the read of the next
one starts at once, so the server's work overlaps the emission of the batch; a
read under way when the source stops is waited for, and what it logged is emitted
by the next instance from the log.

Fencing. Every delivery log has an owner key holding the generation
(``Context.generation``) of the instance that owns it: an instance claims its log
(and, in a rescale or a restart that abandons one, the logs it takes over) when it
opens, and a claim by an older generation is refused, except by a fresh start (no
state taken over: a new app, or a master with a new store, counts generations from 1
again). A read whose instance no
longer owns its log is undone in the same transaction (its entries go back to the
group, undelivered, for the owner to read) and the instance stops with an error:
an instance left running on a worker cut off from the master, after the master
started its replacement elsewhere, takes nothing from the stream and writes
nothing to the log its replacement emits from.

A rescale (another parallelism) hands each old instance's log to new instance
``j % n``, which puts the entries it emitted (acked at the new instance's first
complete checkpoint) before those it did not (emitted first); until that
checkpoint the old logs are kept, so a restart from an older checkpoint, at
either parallelism, emits every entry it does not cover once (see ``_RESCALE``
and ``_RESUME``). A second rescale before that checkpoint is refused.

Limits: entries trimmed from the stream (``MAXLEN``) before they were emitted are
skipped with a warning.

The sink is a :class:`hotwire.sinks.TransactionalSink`: a transaction's records
are written at pre-commit to a Redis list (durable, not visible), and commit
moves them into the output stream with ``XADD`` in one Lua call that also sets
a marker key for the transaction. Committing again (recovery re-commits what
the restored checkpoint holds) finds the marker and adds nothing.

When the Redis server goes away, the source and the sink wait for it (see
``hotwire.connectors.outage``): they retry with backoff, and the source re-reads
its delivery log from its position on the new connection, so an entry handed to
it by a read whose reply was lost is emitted, once. The server must keep its data
across the restart (``appendonly yes``) for the delivery log, the pending
entries and the sink's prepared transactions to survive it.

Options are checked when the app is loaded: a missing stream, a URL that is not
``redis://``/``rediss://``/``unix://`` or an unknown option raises
:class:`ValueError` naming the option, so ``streamctl submit`` fails before
anything is deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, ClassVar
from urllib.parse import urlparse

from hotwire.connectors.base import check_typed_options
from hotwire.connectors.delivery import DeliveryLogReader
from hotwire.sinks import TransactionalSink

__all__ = ["RedisStreamSink", "RedisStreamSource"]

log = logging.getLogger(__name__)

_SCHEMES = ("redis", "rediss", "unix")

# A read is one transaction: MULTI; EVAL _MARK; XREADGROUP ... '>'; EVAL _LOG; EXEC.
# Atomically, so an entry is never delivered to the consumer without being in its
# delivery log; the entries reach the client as XREADGROUP's own reply (a Lua call
# that returned them would convert every entry to Lua and back: about 1.3 us of the
# server's CPU per entry more).
# _MARK keeps group ARGV[1]'s last delivered id of stream KEYS[1] in KEYS[2]: every
# entry the read delivers comes after it.
_MARK = """
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then
      last = g[i + 1]
    end
  end
  if name == ARGV[1] then
    redis.call('SET', KEYS[2], last)
    return 1
  end
end
return 0
"""

# _LOG appends to the delivery log KEYS[2] the ids the read delivered: the entries
# pending for consumer ARGV[2] of group ARGV[1] after the mark KEYS[3] (up to ARGV[3]),
# in id order, the order XREADGROUP returned them (one RPUSH per 1000 ids); drops the
# mark and returns how many it logged. When the log's owner KEYS[4] is not generation
# ARGV[4] (a later instance claimed it), the read is undone instead: its entries are
# acknowledged out of the consumer's pending list and the group's last delivered id
# goes back to the mark, so the next read of the owner gets them; returns -1.
_LOG = """
local from = redis.call('GET', KEYS[3])
if not from then return 0 end
redis.call('DEL', KEYS[3])
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '(' .. from, '+', ARGV[3], ARGV[2])
local ids = {}
for i, e in ipairs(p) do ids[i] = e[1] end
if redis.call('GET', KEYS[4]) ~= ARGV[4] then
  for i = 1, #ids, 1000 do
    redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 999, #ids)))
  end
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], from)
  return -1
end
for i = 1, #ids, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ids, i, math.min(i + 999, #ids)))
end
return #ids
"""

# Acks the first N ids of the delivery log KEYS[2], drops them and advances its base
# KEYS[3]. A checkpoint of this instance is complete: when the log was formed by a
# rescale (its entry in the hash KEYS[4]), no restart goes back to the old
# parallelism any more, so the old instances' logs it took over are deleted.
# ARGV: group, N, key prefix, this log's name, generation (-1, nothing done, when the
# log's owner KEYS[5] is another).
_ACK = """
if redis.call('GET', KEYS[5]) ~= ARGV[5] then return -1 end
local n = tonumber(ARGV[2])
local acked = 0
if n > 0 then
  local ids = redis.call('LRANGE', KEYS[2], 0, n - 1)
  if #ids > 0 then
    for i = 1, #ids, 1000 do
      redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 999, #ids)))
    end
    redis.call('LTRIM', KEYS[2], #ids, -1)
    redis.call('INCRBY', KEYS[3], #ids)
  end
  acked = #ids
end
local from = redis.call('HGET', KEYS[4], ARGV[4])
if from then
  for _, name in ipairs(cjson.decode(from).names) do
    redis.call('DEL', ARGV[3] .. name .. ':log', ARGV[3] .. name .. ':base')
  end
  redis.call('HDEL', KEYS[4], ARGV[4])
end
return acked
"""

# Claims the delivery logs whose owner keys are KEYS for generation ARGV[1]; refused
# (an error reply FENCED) when one of them is owned by a later generation, unless
# ARGV[2] is '1' (a fresh start: no state taken over, so a new app or a master with
# a new store, whose generations count from 1 again).
_CLAIM = """
local g = tonumber(ARGV[1])
for _, k in ipairs(KEYS) do
  local cur = tonumber(redis.call('GET', k) or '-1')
  if cur > g and ARGV[2] ~= '1' then
    return redis.error_reply('FENCED ' .. k .. ' is owned by generation ' .. cur)
  end
end
for _, k in ipairs(KEYS) do redis.call('SET', k, ARGV[1]) end
return 1
"""

# A rescale: forms the delivery log KEYS[2] (base KEYS[3]) of new instance
# ARGV[2] (a name "i-of-n") from the logs of the old instances it takes over
# (ARGV[5]: [[name, position], ...], all of parallelism ARGV[4]): first the entries
# each old instance emitted up to its handed-over position (not acked yet; acked
# at this instance's first complete checkpoint), then those it did not emit, then
# what an earlier attempt of the same rescale read itself (a restart before its
# first checkpoint). The base makes position ARGV[3] the index of the first entry
# not emitted. Registers the rescale in the hash KEYS[1] (name -> {of, names,
# derived, fold}) until that first checkpoint; the old logs stay as they are
# meanwhile (a restart from an older checkpoint reads them again). Refuses (an
# error reply) when the old parallelism is itself a rescale no checkpoint covers.
# Returns {number of entries already emitted, ids from there on}.
_RESCALE = """
local prefix, me, q, m = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local taken = cjson.decode(ARGV[5])
local own = {}
local h = redis.call('HGETALL', KEYS[1])
for i = 2, #h, 2 do
  if cjson.decode(h[i]).n == m then
    return redis.error_reply('UNFINISHED the rescale to ' .. m .. ' instances has no ' ..
                             'complete checkpoint yet')
  end
end
local prev = redis.call('HGET', KEYS[1], me)
if prev then
  local f = cjson.decode(prev)
  if f.of ~= m then
    return redis.error_reply('UNFINISHED the rescale from ' .. f.of .. ' instances has no ' ..
                             'complete checkpoint yet')
  end
  own = redis.call('LRANGE', KEYS[2], f.derived, -1)
end
local covered, rest, names = {}, {}, {}
for _, t in ipairs(taken) do
  local name, p = t[1], tonumber(t[2])
  names[#names + 1] = name
  local ids = redis.call('LRANGE', prefix .. name .. ':log', 0, -1)
  local k = p - tonumber(redis.call('GET', prefix .. name .. ':base') or '0')
  k = math.max(0, math.min(k, #ids))
  for i = 1, k do covered[#covered + 1] = ids[i] end
  for i = k + 1, #ids do rest[#rest + 1] = ids[i] end
end
local all = {}
for _, x in ipairs(covered) do all[#all + 1] = x end
for _, x in ipairs(rest) do all[#all + 1] = x end
local derived = #all
for _, x in ipairs(own) do all[#all + 1] = x end
redis.call('DEL', KEYS[2])
for i = 1, #all, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(all, i, math.min(i + 999, #all)))
end
redis.call('SET', KEYS[3], q - #covered)
local rec = {of = m, n = tonumber(ARGV[7]), names = names, derived = derived,
             fold = tonumber(ARGV[6])}
redis.call('HSET', KEYS[1], me, cjson.encode(rec))
local out = {}
for i = #covered + 1, #all do out[#out + 1] = all[i] end
return {#covered, out}
"""

# A restart at parallelism ARGV[2] of old instance ARGV[3] (log KEYS[2]): a rescale
# away from that parallelism that no checkpoint covers was abandoned (the app went
# back to its checkpoint). What the rescale's new instances read themselves is
# still pending: each one's reads go at the end of the log of the old instance
# named in its entry ("fold"), to be emitted from there, and its log is deleted.
# Also renames a log of the earlier form (named by the instance index alone). The
# folded logs' owners become generation ARGV[5] (their instances are abandoned).
_RESUME = """
local prefix, m, j = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', ARGV[4] .. ':log') == 1 then
  redis.call('RENAME', ARGV[4] .. ':log', KEYS[2])
  if redis.call('EXISTS', ARGV[4] .. ':base') == 1 then
    redis.call('RENAME', ARGV[4] .. ':base', KEYS[3])
  end
end
local folded = 0
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  local name, f = h[i], cjson.decode(h[i + 1])
  if f.of == m and f.fold == j then
    local own = redis.call('LRANGE', prefix .. name .. ':log', f.derived, -1)
    for k = 1, #own, 1000 do
      redis.call('RPUSH', KEYS[2], unpack(own, k, math.min(k + 999, #own)))
    end
    folded = folded + #own
    redis.call('DEL', prefix .. name .. ':log', prefix .. name .. ':base')
    redis.call('SET', prefix .. name .. ':owner', ARGV[5])
    redis.call('HDEL', KEYS[1], name)
  end
end
return folded
"""

# Commits transaction T: its records (list KEYS[2]) go into stream KEYS[1] unless
# marker KEYS[3] says they already did. ARGV[1]: the marker's time to live.
_COMMIT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local recs = redis.call('LRANGE', KEYS[2], 0, -1)
for _, r in ipairs(recs) do
  local f = cjson.decode(r)
  redis.call('XADD', KEYS[1], '*', unpack(f))
end
redis.call('SET', KEYS[3], #recs, 'EX', tonumber(ARGV[1]))
redis.call('DEL', KEYS[2])
return #recs
"""


def _check_url(url: Any, who: str) -> str:
    if not isinstance(url, str) or urlparse(url).scheme not in _SCHEMES:
        msg = (
            f"{who}: url={url!r} is not a Redis URL; "
            "give redis://HOST:PORT/DB (or rediss://, unix://)"
        )
        raise ValueError(msg)
    parsed = urlparse(url)
    if parsed.scheme != "unix" and not parsed.hostname:
        msg = f"{who}: url={url!r} has no host; give redis://HOST:PORT/DB"
        raise ValueError(msg)
    return url


def _check_stream(stream: Any, who: str) -> str:
    if not isinstance(stream, str) or not stream:
        msg = f"{who}: the stream name is missing; give stream='NAME'"
        raise ValueError(msg)
    return stream


class RedisStreamSource:
    """A source reading Redis stream ``stream`` exactly once (see the module docstring).

    Options: ``url``, ``stream`` (required); ``batch`` (entries per read, default
    500); ``start`` (where a new consumer group starts: ``"0"`` the beginning,
    default, or ``"$"`` new entries only); ``poll_interval`` (seconds between reads
    of an idle stream, default 0.05).
    """

    _OPTIONS: ClassVar[dict[str, Any]] = {
        "url": str,
        "stream": str,
        "batch": int,
        "start": str,
        "poll_interval": (int, float),
    }

    def __init__(self, **options: Any) -> None:
        who = "RedisStreamSource"
        check_typed_options(who, options, self._OPTIONS)
        self.url = _check_url(options.get("url"), who)
        self.stream = _check_stream(options.get("stream"), who)
        self.batch = int(options.get("batch", 500))
        self.start = str(options.get("start", "0"))
        self.poll_interval = float(options.get("poll_interval", 0.05))
        if self.batch < 1:
            msg = f"{who}: batch={self.batch} must be at least 1"
            raise ValueError(msg)

    def __call__(self, ctx: Any) -> _Reader:
        return _Reader(self, ctx)

    def check_server(self) -> None:
        """Raise the server's error if it cannot be reached: a submit or an upgrade
        that starts this source is refused with it (a restart waits instead)."""
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
        finally:
            client.close()


def group_name(app: str, pe: str) -> str:
    """The consumer group a :class:`RedisStreamSource` PE reads with."""
    return f"hotwire.{app}.{pe}"


class _Reader(DeliveryLogReader):
    """One source instance's async iterator (see the module docstring and
    :class:`hotwire.connectors.delivery.DeliveryLogReader`)."""

    def __init__(self, conf: RedisStreamSource, ctx: Any) -> None:
        super().__init__(ctx, _display(conf.url), conf.batch)
        self.conf = conf
        self.group = group_name(ctx.app, ctx.pe)
        self.name = f"{ctx.instance}-of-{getattr(ctx, 'parallelism', 1) or 1}"
        self.consumer = self.name
        self.prefix = f"hotwire:src:{ctx.app}:{ctx.pe}:"
        self.log_key = f"{self.prefix}{self.name}:log"
        self.base_key = f"{self.prefix}{self.name}:base"
        self.mark_key = f"{self.prefix}{self.name}:mark"  # only within a read
        self.rescales_key = f"{self.prefix}rescales"
        self.owner_key = f"{self.prefix}{self.name}:owner"
        self.gen = str(self.generation)  # as the owner keys hold it
        self._redis: Any = None
        self._next: asyncio.Task[Any] | None = None  # the read of the next batch, under way
        self._formed = False  # this instance's log is formed (its first open succeeded)

    def transient(self, exc: BaseException) -> bool:
        return _transient(exc)

    async def open(self, position: int) -> list[Any]:
        import redis.asyncio as aioredis
        from redis.exceptions import ResponseError

        r = aioredis.from_url(
            self.conf.url, decode_responses=True, socket_connect_timeout=5, socket_timeout=30
        )
        self._redis = r
        try:
            await r.xgroup_create(self.conf.stream, self.group, id=self.conf.start, mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        n = int(getattr(self.ctx, "parallelism", 1) or 1)
        me = int(self.ctx.instance)
        # Once the log is formed, a reconnection (the server was unreachable) reads it
        # from the position: forming it again from the predecessors' logs would drop
        # what this instance read since (and, before its first checkpoint, emit again
        # what it emitted since).
        preds = [] if self._formed else list(getattr(self.ctx, "predecessors", None) or ())
        rescaled = any(int(p["of"]) != n for p in preds)
        claims = [self.owner_key]
        if rescaled:  # the old instances' logs it takes over
            claims += [
                f"{self.prefix}{p['instance']}-of-{p['of']}:owner"
                for p in preds
                if int(p["instance"]) % n == me
            ]
        fresh = not preds and position == 0 and not self._formed
        try:
            await r.eval(_CLAIM, len(claims), *claims, self.gen, "1" if fresh else "0")
        except ResponseError as e:
            if "FENCED" not in str(e):
                raise
            self.superseded(self.name, str(e).split("FENCED ", 1)[-1])
        if rescaled:
            ids = await self._rescale(r, position, n, me, preds)
            self._formed = True
            return ids
        if preds:  # restored: at the same parallelism
            await r.eval(
                _RESUME,
                3,
                self.rescales_key,
                self.log_key,
                self.base_key,
                self.prefix,
                n,
                me,
                f"{self.prefix}{me}",
                self.gen,
            )
        self._formed = True
        base = int(await r.get(self.base_key) or 0)
        if position < base:
            log.warning(
                "app %r PE %r instance %s: position %d is before the acknowledged %d; "
                "resuming from %d",
                self.ctx.app,
                self.ctx.pe,
                self.consumer,
                position,
                base,
                base,
            )
            self.position = position = base
        return [str(i) for i in await r.lrange(self.log_key, position - base, -1)]

    async def _rescale(
        self, r: Any, position: int, n: int, me: int, preds: list[dict[str, Any]]
    ) -> list[Any]:
        """The delivery log of a rescaled instance, formed from the old instances'
        logs it takes over (``j % n == me``); the ids to emit first."""
        from redis.exceptions import ResponseError

        m = int(preds[0]["of"])
        taken = [[f"{p['instance']}-of-{m}", int(p["position"])] for p in preds]
        taken = [t for t, p in zip(taken, preds, strict=True) if int(p["instance"]) % n == me]
        try:
            done, ids = await r.eval(
                _RESCALE,
                3,
                self.rescales_key,
                self.log_key,
                self.base_key,
                self.prefix,
                self.name,
                position,
                m,
                json.dumps(taken),
                me % m,
                n,
            )
        except ResponseError as e:
            if "UNFINISHED" not in str(e):
                raise
            why = str(e).split("UNFINISHED ", 1)[-1]
            msg = (
                f"app {self.ctx.app!r} PE {self.ctx.pe!r}: the Redis source cannot go from "
                f"{m} to {n} instances: {why} (its entries would be read twice or lost); "
                f"upgrade to {m} instances, let a checkpoint complete, then rescale"
            )
            raise RuntimeError(msg) from None
        log.info(
            "app %r PE %r instance %s: rescaled from %d instances, took over %s; "
            "%d entries emitted before, %d to emit",
            self.ctx.app,
            self.ctx.pe,
            self.name,
            m,
            ", ".join(t[0] for t in taken) or "no log",
            done,
            len(ids),
        )
        return [str(i) for i in ids]

    async def fetch(self, ids: list[Any]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as p:
            for i in ids:
                p.xrange(self.conf.stream, i, i)
            found = await p.execute()
        out = []
        for i, got in zip(ids, found, strict=True):
            if got:
                out.append(_record(got[0]))
            else:
                log.warning(
                    "app %r PE %r: entry %s of stream %r is gone (trimmed?); skipped",
                    self.ctx.app,
                    self.ctx.pe,
                    i,
                    self.conf.stream,
                )
        return out

    def _start_read(self) -> asyncio.Task[Any]:
        return asyncio.ensure_future(self._read_logged())

    async def _read_logged(self) -> list[Any]:
        """Up to ``batch`` new entries, in the delivery log (see ``_MARK``); none
        while the worker holds its output (a read ahead started before it stood still)."""
        if self.held():
            return []
        stream, batch = self.conf.stream, self.conf.batch
        async with self._redis.pipeline(transaction=True) as p:
            p.eval(_MARK, 2, stream, self.mark_key, self.group)
            p.xreadgroup(self.group, self.consumer, {stream: ">"}, count=batch)
            p.eval(
                _LOG,
                4,
                stream,
                self.log_key,
                self.mark_key,
                self.owner_key,
                self.group,
                self.consumer,
                batch,
                self.gen,
            )
            _marked, got, logged = await p.execute()
        entries = got[0][1] if got else []
        if logged == -1:
            self.superseded(self.name, await self._owner())
        if logged != len(entries):  # the delivery log no longer matches the position
            msg = (
                f"app {self.ctx.app!r} PE {self.ctx.pe!r}: a read of stream "
                f"{stream!r} delivered {len(entries)} entries and logged {int(logged)} "
                f"(was the group {self.group!r} changed by hand, XGROUP SETID?); "
                "the source stops rather than lose or repeat entries"
            )
            raise RuntimeError(msg)
        return list(entries)

    async def read(self) -> list[Any]:
        """The next batch; after a full one the read of the batch after it starts at
        once, so the server's work overlaps the emission of this one. A read still
        under way when the iterator is cancelled goes on (shielded) and ``close``
        waits for it: its entries, in the log, are emitted from there on reopening."""
        if self._next is None:
            self._next = self._start_read()
        entries = await asyncio.shield(self._next)
        self._next = None
        if not entries:
            await asyncio.sleep(self.conf.poll_interval)
            return []
        if len(entries) >= self.conf.batch:
            self._next = self._start_read()
        return [_record(e) for e in entries]

    async def ack(self, position: int) -> None:
        base = int(await self._redis.get(self.base_key) or 0)
        acked = await self._redis.eval(
            _ACK,
            5,
            self.conf.stream,
            self.log_key,
            self.base_key,
            self.rescales_key,
            self.owner_key,
            self.group,
            position - base,
            self.prefix,
            self.name,
            self.gen,
        )
        if acked == -1:
            self.superseded(self.name, await self._owner())

    async def _owner(self) -> str:
        return f"{self.owner_key} is owned by generation {await self._redis.get(self.owner_key)}"

    async def close(self) -> None:
        task, self._next = self._next, None
        if task is not None:
            # A read sent to the server may have logged entries: let it finish before
            # the connection goes (its error, if any, is the connection's, gone anyway).
            with contextlib.suppress(Exception):
                await task
        r, self._redis = self._redis, None
        if r is not None:
            await r.aclose()


def _record(entry: Any) -> dict[str, Any]:
    eid, fields = entry
    return {"id": eid, "fields": fields}


class RedisStreamSink(TransactionalSink):
    """An exactly-once sink into Redis stream ``stream`` (see the module docstring).

    ``RedisStreamSink(url=..., stream=...)`` returns a sink class bound to those
    options (the runtime makes one object per sink instance). A record that is a
    dict of str, int or float values becomes the entry's fields; any
    other record goes as JSON in the field ``data``. Option ``marker_ttl``:
    seconds a commit marker is kept (default 7 days).
    """

    _OPTIONS: ClassVar[dict[str, Any]] = {"url": str, "stream": str, "marker_ttl": int}
    options: ClassVar[dict[str, Any]] = {}

    def __new__(cls, **options: Any) -> Any:
        if not options:
            return super().__new__(cls)  # the runtime making a sink object
        who = "RedisStreamSink"
        check_typed_options(who, options, cls._OPTIONS)
        _check_url(options.get("url"), who)
        _check_stream(options.get("stream"), who)
        bound = {"marker_ttl": 7 * 24 * 3600, **options}
        return type(cls.__name__, (cls,), {"options": bound, "__module__": cls.__module__})

    def __init__(self, **options: Any) -> None:
        pass

    def setup(self, ctx: Any) -> None:
        import redis

        if not self.options:
            msg = (
                f"PE {getattr(ctx, 'pe', '?')!r}: use RedisStreamSink(url=..., stream=...) "
                "as the sink, not the bare class"
            )
            raise ValueError(msg)
        self.stream = self.options["stream"]
        self.ttl = int(self.options["marker_ttl"])
        self.url = self.options["url"]
        self.redis = redis.Redis.from_url(
            self.url, decode_responses=True, socket_connect_timeout=5, socket_timeout=30
        )
        self.redis.ping()  # an unreachable server refuses a submit or an upgrade here
        self._commit = self.redis.register_script(_COMMIT)
        self._txn = ""
        self._recs: list[str] = []

    def server(self) -> str:
        return _display(str(self.options.get("url", "the Redis server")))

    def is_transient(self, exc: BaseException) -> bool:
        return _transient(exc)

    def begin(self, txn: str) -> None:
        self._txn, self._recs = txn, []

    def write(self, record: Any) -> None:
        self._recs.append(json.dumps(_fields(record)))

    def _keys(self, txn: str) -> list[str]:
        return [self.stream, f"hotwire:txn:{txn}", f"hotwire:txn:{txn}:done"]

    def pre_commit(self) -> Any:
        if not self._recs:
            return None
        key = self._keys(self._txn)[1]
        with self.redis.pipeline(transaction=True) as p:
            p.delete(key)
            for i in range(0, len(self._recs), 1000):
                p.rpush(key, *self._recs[i : i + 1000])
            p.execute()
        self._recs = []
        return self._txn

    def commit(self, handle: Any) -> None:
        self._commit(keys=self._keys(str(handle)), args=[self.ttl])

    def abort(self) -> None:
        self._recs = []

    def teardown(self) -> None:
        r = getattr(self, "redis", None)
        if r is not None:
            r.close()


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` means the Redis server is unreachable (or still loading its data)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError)


def _display(url: str) -> str:
    """``url`` without a password, for logs and status."""
    p = urlparse(url)
    if p.password is None:
        return url
    return url.replace(f":{p.password}@", ":***@", 1)


def _fields(record: Any) -> list[Any]:
    """A record as a flat [field, value, ...] list for XADD."""
    if isinstance(record, dict) and record and all(isinstance(k, str) for k in record):
        values = record.values()
        if all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in values):
            flat: list[str] = []
            for k, v in record.items():
                flat += [k, v if isinstance(v, str) else repr(v)]
            return flat
    return ["data", json.dumps(record, default=repr)]
