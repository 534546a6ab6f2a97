"""The master's per-app locks: refuse or wait, and wake waiters on release."""

from __future__ import annotations

import asyncio

from hotwire.master.locks import AppLocks


def test_take_refuses_a_held_lock_and_names_its_holder() -> None:
    locks = AppLocks()
    assert locks.take("a", "an upgrade to version 2")
    assert not locks.take("a", "a kill")
    assert "a" in locks and locks.holder("a") == "an upgrade to version 2"
    assert locks.take("b", "a submit"), "apps lock independently"
    locks.release("a")
    assert "a" not in locks and locks.holder("a") == ""
    assert locks.take("a", "a kill")


def test_waiters_take_the_lock_in_turn_when_it_is_released() -> None:
    async def run() -> list[str]:
        locks = AppLocks()
        order: list[str] = []
        assert locks.take("a", "an upgrade")

        async def recovery(name: str) -> None:
            await locks.acquire("a", name)
            order.append(name)
            await asyncio.sleep(0.01)
            locks.release("a")

        async def checkpoint() -> None:
            await locks.wait_free("a")
            order.append("checkpoint")

        tasks = [asyncio.create_task(c) for c in (recovery("r1"), recovery("r2"), checkpoint())]
        await asyncio.sleep(0.05)
        assert order == [], "nothing runs while the upgrade holds the lock"
        locks.release("a")
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        assert "a" not in locks
        return order

    order = asyncio.run(run())
    assert sorted(order) == ["checkpoint", "r1", "r2"]
