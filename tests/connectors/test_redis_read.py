"""The Redis Streams source's read, instance by instance against a real redis-server:
one MULTI/EXEC delivers a batch and logs exactly its ids, the read of the next batch
runs while one is emitted and is waited for when the source stops, and a group
changed by hand stops the source instead of losing or repeating entries."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from connector_servers import redis_url  # noqa: F401 - a fixture

from hotwire.connectors.redis_streams import RedisStreamSource, group_name
from hotwire.sdk.pe import Context

redis = pytest.importorskip("redis")

LOG = "hotwire:src:a:src:0-of-1:log"
TEXTS = ["", "ключ ✓ 键", "tab\there", "new\nline", "back\\slash", "0"]


def _ctx(position: int = 0) -> Context:
    preds = [{"instance": 0, "of": 1, "position": position}] if position else []
    return Context("a", "src", 0, 1, position=position, predecessors=preds)


def _fields(seq: int) -> dict[str, Any]:
    return {"seq": seq, "txt": TEXTS[seq % len(TEXTS)], "7": seq % 7, "e": ""}


def _feed(r: Any, seqs: range) -> None:
    with r.pipeline(transaction=False) as p:
        for s in seqs:
            p.xadd("in", _fields(s))
        p.execute()


async def _take(it: Any, n: int) -> list[dict[str, Any]]:
    """``n`` records from the reader (its own loop), or fewer when three reads in a
    row find nothing new."""
    out: list[dict[str, Any]] = []
    idle = 0
    while len(out) < n and idle < 3:
        if not it._buf:
            await it._step()
            idle = 0 if it._buf else idle + 1
            continue
        out.append(await it.__anext__())
    return out


def _pending(r: Any) -> int:
    return int(r.xpending("in", group_name("a", "src"))["pending"])


def test_each_read_logs_exactly_the_entries_it_delivers_in_order(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    n = 5000
    _feed(r, range(n))
    src = RedisStreamSource(url=redis_url, stream="in", batch=2000, poll_interval=0.01)

    async def run() -> list[dict[str, Any]]:
        it = src(_ctx())
        try:
            got = await _take(it, n + 1)
            it.checkpoint_complete(len(got))
            await it._step()  # the ack runs in the reader's next step
            return got
        finally:
            await it.aclose()

    got = asyncio.run(run())
    ids = [i for i, _f in r.xrange("in")]
    assert [g["id"] for g in got] == ids
    assert [g["fields"] for g in got] == [
        {k: str(v) for k, v in _fields(s).items()} for s in range(n)
    ]
    assert _pending(r) == 0 and r.llen(LOG) == 0


def test_a_read_under_way_when_the_source_stops_is_logged_and_emitted_after(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(6000))
    src = RedisStreamSource(url=redis_url, stream="in", batch=2000, poll_interval=0.01)

    async def first() -> list[dict[str, Any]]:
        it = src(_ctx())
        try:
            return await _take(it, 2000)  # a full batch: the next read starts at once
        finally:
            await it.aclose()  # waits for that read

    one = asyncio.run(first())
    assert len(one) == 2000
    assert r.llen(LOG) == 4000, "the read under way logged its batch before the close"

    async def again() -> list[dict[str, Any]]:
        it = src(_ctx(position=2000))
        try:
            return await _take(it, 10_000)
        finally:
            await it.aclose()

    two = asyncio.run(again())
    seqs = [int(x["fields"]["seq"]) for x in one + two]
    assert seqs == list(range(6000)), "every entry once, in the stream's order"


def test_a_group_changed_by_hand_stops_the_source_with_what_it_found(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(3))
    src = RedisStreamSource(url=redis_url, stream="in", batch=100, poll_interval=0.01)

    async def run() -> None:
        it = src(_ctx())
        try:
            assert len(await _take(it, 3)) == 3
            # By hand: an entry not delivered yet is made pending for the consumer
            # (XCLAIM ... FORCE) and deleted; the next read delivers only the other.
            a = r.xadd("in", _fields(3))
            b = r.xadd("in", _fields(4))
            r.execute_command("XCLAIM", "in", group_name("a", "src"), "0-of-1", 0, b, "FORCE")
            r.xdel("in", b)
            assert a
            with pytest.raises(
                RuntimeError,
                match=r"delivered 1 entries and logged 2 .*the source stops rather than lose",
            ):
                await _take(it, 10)
        finally:
            await it.aclose()

    asyncio.run(run())
