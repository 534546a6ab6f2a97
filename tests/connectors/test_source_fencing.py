"""Fencing the sources with a delivery log in their server, against a real
redis-server and nats-server: an older instance still running (its worker cut off
from the master, which started a replacement elsewhere) takes nothing from the
stream once the replacement claimed the delivery log. Before, a Redis instance's
reads moved entries into the log behind the replacement's position, where no one
emitted them (lost), and a JetStream instance overwrote the replacement's log
with its own."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from connector_servers import nats_url, redis_url  # noqa: F401 - fixtures

from hotwire.connectors.nats_js import JetStreamSource
from hotwire.connectors.redis_streams import RedisStreamSource, group_name
from hotwire.sdk.pe import Context

redis = pytest.importorskip("redis")
nats = pytest.importorskip("nats")

TOTAL = 600
BATCH = 50


def _ctx(generation: int, position: int = 0, preds: Any = ()) -> Context:
    return Context(
        "a",
        "src",
        0,
        1,
        position=position,
        predecessors=[dict(p) for p in preds],
        generation=generation,
    )


def _seq(rec: Any) -> int:
    return int(rec["fields"]["seq"])


async def _take(it: Any, n: int, value: Callable[[Any], int] = _seq) -> list[int]:
    """``n`` records' values from the reader's own loop."""
    return [value(await asyncio.wait_for(it.__anext__(), 20)) for _ in range(n)]


def _data(rec: Any) -> int:
    return int(rec["data"])


async def _publish(url: str, total: int) -> None:
    """Messages "0" .. total-1 into a new JetStream stream IN."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="IN", subjects=["in.>"])
        for i in range(total):
            await js.publish("in.x", str(i).encode())
    finally:
        await nc.close()


async def _step(it: Any) -> None:
    """One step of the reader's own loop (an ack due, then a read); a read that timed
    out as the server was slow to answer (under load) counts as nothing read, as in
    the loop."""
    try:
        await it._step()
    except Exception as e:
        if not it.transient(e):
            raise


async def _replaced_while_running(
    src: Any, value: Callable[[Any], int], batch: int, total: int, old_acks: bool
) -> tuple[list[int], list[int], str]:
    """Instance 0 of 1 (generation 3) emits three batches; a checkpoint covering two
    completes (``old_acks``: the old one acks it, which also makes it read ahead).
    The master declares its worker dead and restarts the app from the checkpoint:
    the replacement (generation 5) opens on the same log and emits from there, while
    the old one goes on (its worker cannot reach the master, so nothing stops it)
    until its server refuses it. Returns what each emitted and the old one's error."""

    old = src(_ctx(generation=3))
    new = None
    try:
        emitted_old = await _take(old, 3 * batch, value)
        old.checkpoint_complete(2 * batch)
        if old_acks:
            await _step(old)  # the ack, and a read logged (not emitted)
        preds = [{"instance": 0, "of": 1, "position": 2 * batch}]
        new = src(_ctx(generation=5, position=2 * batch, preds=preds))
        emitted_new = await _take(new, batch, value)  # the third batch again, from the log
        with pytest.raises(RuntimeError, match="was replaced") as e:
            while True:
                await asyncio.wait_for(old.__anext__(), 20)
        emitted_new += await _take(new, total - 3 * batch, value)
        new.checkpoint_complete(total)
        await _step(new)  # the ack
        return emitted_old, emitted_new, str(e.value)
    finally:
        await old.aclose()
        if new is not None:
            await new.aclose()


def test_an_older_instance_still_running_takes_nothing_once_replaced(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with r.pipeline(transaction=False) as p:
        for s in range(TOTAL):
            p.xadd("in", {"seq": s})
        p.execute()
    src = RedisStreamSource(url=redis_url, stream="in", batch=BATCH, poll_interval=0.01)

    emitted_old, emitted_new, why = asyncio.run(
        _replaced_while_running(src, _seq, BATCH, TOTAL, old_acks=False)
    )
    assert "generation 5" in why and "instance 0-of-1 (generation 3)" in why, why
    # What the checkpoint covers came from old; everything after it from new, once.
    assert emitted_old == list(range(3 * BATCH))
    assert emitted_new == list(range(2 * BATCH, TOTAL))
    assert int(r.xpending("in", group_name("a", "src"))["pending"]) == 0
    assert r.llen("hotwire:src:a:src:0-of-1:log") == 0


def test_an_older_instance_cannot_claim_the_log_back(
    redis_url: str,  # noqa: F811
) -> None:
    """An instance of an earlier generation that took over state (a restart's) and
    opens (or reconnects) after its replacement claimed the log is refused before it
    reads or rewrites anything; the replacement reads on. (A fresh start, which took
    over nothing, claims the log whatever owned it: the test below.)"""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for s in range(2 * BATCH):
        r.xadd("in", {"seq": s})
    src = RedisStreamSource(url=redis_url, stream="in", batch=BATCH, poll_interval=0.01)

    async def run() -> tuple[list[int], str]:
        new = src(_ctx(generation=9))
        old = src(_ctx(generation=8, preds=[{"instance": 0, "of": 1, "position": 0}]))
        try:
            got = await _take(new, BATCH)
            with pytest.raises(RuntimeError, match="was replaced") as e:
                await asyncio.wait_for(old.__anext__(), 20)
            got += await _take(new, BATCH)
            return got, str(e.value)
        finally:
            await old.aclose()
            await new.aclose()

    got, why = asyncio.run(run())
    assert "owned by generation 9" in why, why
    assert Counter(got) == Counter(range(2 * BATCH))
    assert r.get("hotwire:src:a:src:0-of-1:owner") == "9"


def test_an_older_jetstream_instance_still_running_is_fenced_once_replaced(
    nats_url: str,  # noqa: F811
) -> None:
    """The same with the JetStream source: the old instance's next log write is
    refused, it stops, and what it fetched then reaches the replacement (the server
    delivers it again after ``ack_wait``); every message once."""
    total, batch = 300, 25

    src = JetStreamSource(url=nats_url, stream="IN", batch=batch, ack_wait=1)

    async def run() -> tuple[list[int], list[int], str]:
        await _publish(nats_url, total)
        return await _replaced_while_running(src, _data, batch, total, old_acks=True)

    emitted_old, emitted_new, why = asyncio.run(run())
    assert "(generation 3) was replaced" in why and "generation 5" in why, why
    assert emitted_old == list(range(3 * batch))
    assert sorted(emitted_new) == list(range(2 * batch, total)), emitted_new
    assert len(emitted_new) == len(set(emitted_new))


def test_a_fresh_start_takes_over_a_log_of_another_masters_generations(
    redis_url: str,  # noqa: F811
) -> None:
    """A master with a new store (``streamctl up`` with a temporary data directory,
    say) counts generations from 1 again: its fresh source instance (no state taken
    over) claims the log an earlier master's generation 7 owned and reads on from
    where the group is, nothing refused, nothing read twice."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for s in range(2 * BATCH):
        r.xadd("in", {"seq": s})
    src = RedisStreamSource(url=redis_url, stream="in", batch=BATCH, poll_interval=0.01)

    async def run() -> tuple[list[int], list[int]]:
        earlier = src(_ctx(generation=7))
        try:
            first = await _take(earlier, BATCH)
            earlier.checkpoint_complete(BATCH)
            await _step(earlier)  # the ack (and a read of the next batch, logged)
        finally:
            await earlier.aclose()
        fresh = src(_ctx(generation=1))
        try:
            return first, await _take(fresh, BATCH)
        finally:
            await fresh.aclose()

    first, then = asyncio.run(run())
    assert first == list(range(BATCH))
    assert then == list(range(BATCH, 2 * BATCH))
    assert r.get("hotwire:src:a:src:0-of-1:owner") == "1"


def test_a_fresh_jetstream_start_takes_over_a_log_of_another_masters_generations(
    nats_url: str,  # noqa: F811
) -> None:
    """The same with the JetStream source: the fresh instance (generation 1) claims
    the log generation 7 wrote and emits what the acked checkpoint does not cover."""
    total, batch = 100, 25

    async def run() -> tuple[list[int], list[int]]:
        await _publish(nats_url, total)
        src = JetStreamSource(url=nats_url, stream="IN", batch=batch, ack_wait=1)
        data = _data
        earlier = src(_ctx(generation=7))
        try:
            first = await _take(earlier, batch, data)
            earlier.checkpoint_complete(batch)
            await _step(earlier)  # the ack (and a fetch logged, not emitted)
        finally:
            await earlier.aclose()
        fresh = src(_ctx(generation=1))
        try:
            return first, await _take(fresh, total - batch, data)
        finally:
            await fresh.aclose()

    first, then = asyncio.run(run())
    assert first == list(range(batch))
    assert sorted(then) == list(range(batch, total)), then
