"""A Redis stream source on a worker that stood still reads nothing until the master
answers: the master may have declared the worker dead and started the instance
elsewhere, on the same consumer and delivery log, and a read by the old one would
put entries in that log that no instance emits (acked by the new one's position as
if emitted: lost) and shift the new one's later entries past its position
(emitted again after a restart: duplicated)."""

from __future__ import annotations

import asyncio

import pytest
from connector_servers import redis_url  # noqa: F401 - a fixture

from hotwire.connectors.redis_streams import RedisStreamSource, group_name
from hotwire.sdk.pe import Context
from hotwire.testing.cluster import poll_for
from hotwire.worker.fence import OutputHold

redis = pytest.importorskip("redis")


def _delivered(r: object, stream: str) -> str:
    (g,) = r.xinfo_groups(stream)  # type: ignore[attr-defined]
    assert g["name"] == group_name("a", "src")
    return str(g["last-delivered-id"])


def test_a_held_worker_s_source_reads_nothing_until_released(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for s in range(10):
        r.xadd("in", {"seq": s})
    hold = OutputHold("w1")
    it = RedisStreamSource(url=redis_url, stream="in", batch=4)(Context("a", "src", hold=hold))

    async def run() -> int:
        try:
            hold.suspect("it did not run for 1.5 s")  # as after a SIGSTOP
            first = asyncio.ensure_future(it.__anext__())
            await asyncio.to_thread(
                poll_for, lambda: first.done() or hold._waiters, 10, what="a read or a wait"
            )
            assert not first.done(), "the source read while its worker held its output"
            assert not r.keys("hotwire:src:a:src:*:log")
            assert r.xinfo_groups("in") == [] or _delivered(r, "in") == "0-0"
            hold.release("the master answered: the session is current")
            return int((await first)["fields"]["seq"])
        finally:
            await it.aclose()

    assert asyncio.run(run()) == 0


def test_a_read_ahead_started_before_the_worker_stood_still_reads_nothing(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    ids = [r.xadd("in", {"seq": s}) for s in range(10)]
    hold = OutputHold("w1")
    it = RedisStreamSource(url=redis_url, stream="in", batch=4)(Context("a", "src", hold=hold))

    async def run() -> None:
        try:
            await it._step()  # a full batch: the read of the next one starts at once
            assert [int(e["fields"]["seq"]) for e in it._buf] == [3, 2, 1, 0]
            assert it._next is not None
            hold.suspect("it did not run for 1.5 s")  # before that read ran
            assert await it._next == []
            assert _delivered(r, "in") == ids[3]
            assert r.llen("hotwire:src:a:src:0-of-1:log") == 4
        finally:
            hold.release("done")
            await it.aclose()

    asyncio.run(run())
