"""Rescaling the Redis Streams source, driven instance by instance against a real
redis-server: a restart before the rescale's first complete checkpoint (from the
checkpoint before it, at the new or at the old parallelism) emits every entry the
checkpoint does not cover exactly once, and acks leave nothing pending."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from connector_servers import redis_url  # noqa: F401 - a fixture

from hotwire.connectors.redis_streams import RedisStreamSource, group_name
from hotwire.sdk.pe import Context

redis = pytest.importorskip("redis")

TOTAL = 60


def _ctx(instance: int, parallelism: int, position: int = 0, preds: Any = ()) -> Context:
    """The context a worker gives source instance ``instance`` of ``parallelism``."""
    return Context(
        "a", "src", instance, parallelism, position=position, predecessors=[dict(p) for p in preds]
    )


async def _take(
    src: RedisStreamSource, ctx: Any, n: int, complete: bool | str = False
) -> list[int]:
    """Up to ``n`` records' seqs (stopping after three reads found nothing new); what
    the last read logged beyond ``n`` is not emitted, as when a source retires. With
    ``complete``, a checkpoint covering them completes and is acked before the
    reader closes (``"retire"``: by the close itself, with no step in between)."""
    it = src(ctx)
    out: list[int] = []
    idle = 0
    try:
        while len(out) < n and idle < 3:
            if not it._buf:
                await it._step()  # one read (or re-emission) of the reader's own loop
                idle = 0 if it._buf else idle + 1
                continue
            rec = await it.__anext__()
            out.append(int(rec["fields"]["seq"]))
        if complete:
            it.checkpoint_complete(ctx.position + len(out))
            if complete != "retire":
                await it._step()  # the ack runs in the reader's next step
    finally:
        await it.aclose()
    return out


def _feed(r: Any, seqs: range) -> None:
    for s in seqs:
        r.xadd("in", {"seq": s})


def _pending(r: Any) -> int:
    return int(r.xpending("in", group_name("a", "src"))["pending"])


def test_a_restart_at_the_new_parallelism_before_its_first_checkpoint(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(40))
    src = RedisStreamSource(url=redis_url, stream="in", batch=8, poll_interval=0.01)
    first = asyncio.run(_take(src, _ctx(0, 1), 20))  # read 24 into its log, emitted 20
    assert first == list(range(20))
    # The checkpoint C covered 10 of them. Online 1 -> 2 from position 20:
    preds = [{"instance": 0, "of": 1, "position": 20}]
    a = asyncio.run(_take(src, _ctx(0, 2, 20, preds), 6))
    b = asyncio.run(_take(src, _ctx(1, 2, 0, preds), 6))
    assert a[:4] == [20, 21, 22, 23], a  # what the old instance logged and did not emit
    assert a and b and not set(a) & set(b)
    _feed(r, range(40, TOTAL))
    # No checkpoint at 2 completes: the app restarts from C (position 10 at 1 instance).
    c_preds = [{"instance": 0, "of": 1, "position": 10}]
    a2 = asyncio.run(_take(src, _ctx(0, 2, 10, c_preds), 100, complete=True))
    b2 = asyncio.run(_take(src, _ctx(1, 2, 0, c_preds), 100, complete=True))
    seen = Counter(a2 + b2)
    assert set(seen) == set(range(10, TOTAL)), sorted(set(range(10, TOTAL)) - set(seen))
    assert max(seen.values()) == 1, [s for s, k in seen.items() if k > 1]
    # Both acked what they emitted and what the checkpoint covered: nothing pending,
    # and the old instance's log went with the rescale's first checkpoint.
    assert _pending(r) == 0
    assert not r.exists("hotwire:src:a:src:0-of-1:log")
    assert not r.hgetall("hotwire:src:a:src:rescales")


def test_a_rescale_abandoned_for_the_old_parallelism_emits_its_reads_once(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(40))
    src = RedisStreamSource(url=redis_url, stream="in", batch=8, poll_interval=0.01)
    assert asyncio.run(_take(src, _ctx(0, 1), 20)) == list(range(20))
    preds = [{"instance": 0, "of": 1, "position": 20}]
    a = asyncio.run(_take(src, _ctx(0, 2, 20, preds), 10))
    b = asyncio.run(_take(src, _ctx(1, 2, 0, preds), 10))
    assert a and b
    _feed(r, range(40, TOTAL))
    # The rescale is abandoned: the app goes back to 1 instance and checkpoint C.
    c_preds = [{"instance": 0, "of": 1, "position": 10}]
    again = asyncio.run(_take(src, _ctx(0, 1, 10, c_preds), 100, complete=True))
    seen = Counter(again)
    assert set(seen) == set(range(10, TOTAL)), sorted(set(range(10, TOTAL)) - set(seen))
    assert max(seen.values()) == 1, [s for s, k in seen.items() if k > 1]
    assert not r.exists("hotwire:src:a:src:0-of-2:log", "hotwire:src:a:src:1-of-2:log")
    assert not r.hgetall("hotwire:src:a:src:rescales")
    assert _pending(r) == 0


def test_a_second_rescale_before_the_first_has_a_checkpoint_is_refused(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(40))
    src = RedisStreamSource(url=redis_url, stream="in", batch=8, poll_interval=0.01)
    first = asyncio.run(_take(src, _ctx(0, 2), 10))
    preds = [
        {"instance": 0, "of": 2, "position": len(first)},
        {"instance": 1, "of": 2, "position": 0},
    ]
    one = asyncio.run(_take(src, _ctx(0, 1, len(first), preds), 5))
    assert one
    # 1 -> 3 while the 2 -> 1 rescale has no complete checkpoint: refused, loudly.
    preds2 = [{"instance": 0, "of": 1, "position": len(first) + len(one)}]
    with pytest.raises(RuntimeError, match="cannot go from 1 to 3 instances: the rescale to 1"):
        asyncio.run(_take(src, _ctx(0, 3, len(first) + len(one), preds2), 5))


def test_a_rescale_right_after_a_checkpoint_the_source_had_no_step_to_ack(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(TOTAL))
    src = RedisStreamSource(url=redis_url, stream="in", batch=8, poll_interval=0.01)
    first = asyncio.run(_take(src, _ctx(0, 1), 20))
    preds = [{"instance": 0, "of": 1, "position": 20}]
    # A checkpoint at 2 instances completes; held back by backpressure, the instances
    # read nothing more before an upgrade retires them: the ack runs as they close.
    a = asyncio.run(_take(src, _ctx(0, 2, 20, preds), 10, complete="retire"))
    b = asyncio.run(_take(src, _ctx(1, 2, 0, preds), 10, complete="retire"))
    assert not r.hgetall("hotwire:src:a:src:rescales")
    preds2 = [
        {"instance": 0, "of": 2, "position": 20 + len(a)},
        {"instance": 1, "of": 2, "position": len(b)},
    ]
    rest = asyncio.run(_take(src, _ctx(0, 1, 20 + len(a), preds2), 100, complete=True))
    seen = Counter(first + a + b + rest)
    assert set(seen) == set(range(TOTAL)), sorted(set(range(TOTAL)) - set(seen))
    assert max(seen.values()) == 1, [s for s, k in seen.items() if k > 1]
    assert _pending(r) == 0


def test_a_delivery_log_of_the_earlier_form_is_taken_over_by_a_restored_instance(
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(10))
    # What an earlier version left: a log named by the instance index alone.
    r.xgroup_create("in", group_name("a", "src"), id="0")
    got = r.xreadgroup(group_name("a", "src"), "0", {"in": ">"}, count=10)
    r.rpush("hotwire:src:a:src:0:log", *[eid for eid, _f in got[0][1]])
    src = RedisStreamSource(url=redis_url, stream="in", batch=8, poll_interval=0.01)
    preds = [{"instance": 0, "of": 1, "position": 4}]
    assert asyncio.run(_take(src, _ctx(0, 1, 4, preds), 100, complete=True)) == list(range(4, 10))
    assert not r.exists("hotwire:src:a:src:0:log")
    assert _pending(r) == 0


@pytest.mark.parametrize("checkpoint", [False, True], ids=["before", "after"])
def test_a_rescaled_instance_that_reconnects_reads_its_own_log_on(
    redis_url: str,  # noqa: F811
    checkpoint: bool,
) -> None:
    """The server drops the connection of an instance formed by a rescale after it
    read and emitted entries of its own, before or after its first complete
    checkpoint: it goes on from its position in its own log (before: not emitting
    again what it emitted; after: not dropping what it read), every entry once."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    _feed(r, range(40))
    src = RedisStreamSource(url=redis_url, stream="in", batch=8, poll_interval=0.01)
    a = asyncio.run(_take(src, _ctx(0, 2), 6, complete=True))
    b = asyncio.run(_take(src, _ctx(1, 2), 6, complete=True))
    preds = [
        {"instance": 0, "of": 2, "position": len(a)},
        {"instance": 1, "of": 2, "position": len(b)},
    ]
    ctx = _ctx(0, 1, len(a) + len(b), preds)

    async def run() -> list[int]:
        it = src(ctx)
        out: list[int] = []
        try:
            while len(out) < 20:  # what the old instances logged, then reads of its own
                out.append(int((await it.__anext__())["fields"]["seq"]))
            if checkpoint:  # the rescale's first checkpoint: the old logs go
                it.checkpoint_complete(ctx.position + len(out))
                while it._buf:
                    out.append(int((await it.__anext__())["fields"]["seq"]))
                await it._step()  # the ack, and a read of its own
                assert not r.hgetall("hotwire:src:a:src:rescales")
            if not it._buf:  # a read of its own, not all emitted yet
                out.append(int((await it.__anext__())["fields"]["seq"]))
            assert it._buf, "nothing read and not emitted yet"
            killed = r.client_kill_filter(_type="normal", skipme=True)  # the reader's
            assert killed >= 1
            _feed(r, range(40, TOTAL))
            while len(out) < TOTAL - 12:
                out.append(int((await asyncio.wait_for(it.__anext__(), 20))["fields"]["seq"]))
            it.checkpoint_complete(ctx.position + len(out))
            await it._step()  # the ack
        finally:
            await it.aclose()
        return out

    seen = Counter(a + b + asyncio.run(run()))
    assert set(seen) == set(range(TOTAL)), sorted(set(range(TOTAL)) - set(seen))
    assert max(seen.values()) == 1, [s for s, k in seen.items() if k > 1]
    assert _pending(r) == 0
