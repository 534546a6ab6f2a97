"""Rescaling the JetStream source, driven instance by instance against a real
nats-server: a restart before the rescale's first complete checkpoint (from the
checkpoint before it, at the new or at the old parallelism) emits every message the
checkpoint does not cover exactly once, and a second rescale before it is refused."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from connector_servers import nats_url  # noqa: F401 - a fixture

from hotwire.connectors.nats_js import JetStreamSource, consumer_name
from hotwire.sdk.pe import Context

nats = pytest.importorskip("nats")

TOTAL = 60


def _ctx(instance: int, parallelism: int, position: int = 0, preds: Any = ()) -> Context:
    """The context a worker gives source instance ``instance`` of ``parallelism``."""
    return Context(
        "a", "src", instance, parallelism, position=position, predecessors=[dict(p) for p in preds]
    )


async def _take(src: JetStreamSource, ctx: Any, n: int, complete: bool = False) -> list[int]:
    """Up to ``n`` records' payloads (stopping after three fetches found nothing new);
    what the last fetch logged beyond ``n`` is not emitted, as when a source retires.
    With ``complete``, a checkpoint covering them completes and is acked."""
    it = src(ctx)
    out: list[int] = []
    idle = 0
    try:
        while len(out) < n and idle < 3:
            if not it._buf:
                await _step(it)
                idle = 0 if it._buf else idle + 1
                continue
            out.append(int((await it.__anext__())["data"]))
        if complete:
            it.checkpoint_complete(ctx.position + len(out))
            while it._ack_due:
                await _step(it)
    finally:
        await it.aclose()
    return out


async def _step(it: Any) -> None:
    """One step of the reader's own loop; an error that means the server is away
    (a fetch that timed out under load) drops the connection, as the loop does."""
    try:
        await it._step()
    except Exception as e:
        if not it.transient(e):
            raise
        await it._drop()


async def _server(url: str, feed: range) -> list[str]:
    """Publish ``feed`` to stream IN (created if needed); the PE's consumers now."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            await js.stream_info("IN")
        except nats.js.errors.NotFoundError:
            await js.add_stream(name="IN", subjects=["in.>"])
        for i in feed:
            await js.publish("in.x", str(i).encode())
        prefix = consumer_name("a", "src")
        return sorted(c.name for c in await js.consumers_info("IN") if c.name.startswith(prefix))
    finally:
        await nc.close()


def _once(*parts: list[int], want: range) -> None:
    seen = Counter(x for p in parts for x in p)
    assert set(seen) == set(want), sorted(set(want) - set(seen))
    assert max(seen.values()) == 1, [s for s, k in seen.items() if k > 1]


def test_a_restart_at_the_new_parallelism_before_its_first_checkpoint(
    nats_url: str,  # noqa: F811
) -> None:
    asyncio.run(_server(nats_url, range(40)))
    src = JetStreamSource(url=nats_url, stream="IN", batch=8)
    assert asyncio.run(_take(src, _ctx(0, 1), 20)) == list(range(20))  # 24 logged
    preds = [{"instance": 0, "of": 1, "position": 20}]
    a = asyncio.run(_take(src, _ctx(0, 2, 20, preds), 6))
    b = asyncio.run(_take(src, _ctx(1, 2, 0, preds), 6))
    assert a and b and not set(a) & set(b)
    assert min(a + b) == 20, "a message the old instance emitted came again"
    asyncio.run(_server(nats_url, range(40, TOTAL)))
    # No checkpoint at 2 completes: the app restarts from C (position 10 at 1 instance).
    c_preds = [{"instance": 0, "of": 1, "position": 10}]
    a2 = asyncio.run(_take(src, _ctx(0, 2, 10, c_preds), 100, complete=True))
    b2 = asyncio.run(_take(src, _ctx(1, 2, 0, c_preds), 100, complete=True))
    _once(a2, b2, want=range(10, TOTAL))
    # Instance 0 completed its checkpoint before instance 1 had read the old logs:
    # it kept them; it deletes them at its next one.
    consumers = asyncio.run(_server(nats_url, range(0)))
    assert consumer_name("a", "src") in consumers
    again = [{"instance": 0, "of": 2, "position": 10 + len(a2)}]
    assert asyncio.run(_take(src, _ctx(0, 2, 10 + len(a2), again), 100, complete=True)) == []
    consumers = asyncio.run(_server(nats_url, range(0)))
    assert consumers == sorted(consumer_name("a", "src", i, 2) for i in range(2))


def test_a_rescale_abandoned_for_the_old_parallelism_emits_its_messages_once(
    nats_url: str,  # noqa: F811
) -> None:
    asyncio.run(_server(nats_url, range(40)))
    src = JetStreamSource(url=nats_url, stream="IN", batch=8)
    assert asyncio.run(_take(src, _ctx(0, 1), 20)) == list(range(20))
    preds = [{"instance": 0, "of": 1, "position": 20}]
    assert asyncio.run(_take(src, _ctx(0, 2, 20, preds), 10))
    assert asyncio.run(_take(src, _ctx(1, 2, 0, preds), 10))
    asyncio.run(_server(nats_url, range(40, TOTAL)))
    # The rescale is abandoned: the app goes back to 1 instance and checkpoint C.
    c_preds = [{"instance": 0, "of": 1, "position": 10}]
    again = asyncio.run(_take(src, _ctx(0, 1, 10, c_preds), 100, complete=True))
    _once(again, want=range(10, TOTAL))
    assert asyncio.run(_server(nats_url, range(0))) == [consumer_name("a", "src")]


def test_a_second_rescale_before_the_first_has_a_checkpoint_is_refused(
    nats_url: str,  # noqa: F811
) -> None:
    asyncio.run(_server(nats_url, range(40)))
    src = JetStreamSource(url=nats_url, stream="IN", batch=8)
    a = asyncio.run(_take(src, _ctx(0, 2), 5))
    b = asyncio.run(_take(src, _ctx(1, 2), 5))
    preds = [
        {"instance": 0, "of": 2, "position": len(a)},
        {"instance": 1, "of": 2, "position": len(b)},
    ]
    one = asyncio.run(_take(src, _ctx(0, 1, len(a), preds), 5))
    _once(a, b, one, want=range(15))
    preds2 = [{"instance": 0, "of": 1, "position": len(a) + len(one)}]
    with pytest.raises(RuntimeError, match="cannot go from 1 to 3 instances: the rescale to 1"):
        asyncio.run(_take(src, _ctx(0, 3, len(a) + len(one), preds2), 5))


def test_an_instance_that_never_read_before_the_rescales_checkpoint_skips_the_old_messages(
    nats_url: str,  # noqa: F811
) -> None:
    asyncio.run(_server(nats_url, range(40)))
    src = JetStreamSource(url=nats_url, stream="IN", batch=8)
    assert asyncio.run(_take(src, _ctx(0, 1), 20)) == list(range(20))
    preds = [{"instance": 0, "of": 1, "position": 20}]
    a = asyncio.run(_take(src, _ctx(0, 2, 20, preds), 6, complete=True))
    # Instance 1 of 2 never opened before a checkpoint at 2 instances completed
    # (position 0); the app restarts from that checkpoint.
    b = asyncio.run(_take(src, _ctx(1, 2, 0, [{"instance": 1, "of": 2, "position": 0}]), 100))
    a2 = asyncio.run(
        _take(
            src, _ctx(0, 2, 20 + len(a), [{"instance": 0, "of": 2, "position": 20 + len(a)}]), 100
        )
    )
    _once(list(range(20)), a, b, a2, want=range(40))
