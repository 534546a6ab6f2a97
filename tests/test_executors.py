"""What each executor does with a batch: every record once, failures reported and skipped."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from hotwire.pe.executors import (
    FilterExecutor,
    FlatMapExecutor,
    MapExecutor,
    ReduceExecutor,
    SinkExecutor,
)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("n", [1, 7, 300, 1000])
def test_sink_applies_every_record_once_and_reports_failures(is_async: bool, n: int) -> None:
    seen: list[int] = []
    errors: list[tuple[int, str]] = []

    def write(r: int) -> None:
        if r % 97 == 5 or r == n - 1:
            raise ValueError(f"bad {r}")
        seen.append(r)

    async def awrite(r: int) -> None:
        write(r)

    ex = SinkExecutor(awrite if is_async else write, None, lambda r, e: errors.append((r, str(e))))
    _run(ex.process(list(range(n))))
    bad = [r for r in range(n) if r % 97 == 5 or r == n - 1]
    assert seen == [r for r in range(n) if r not in bad]
    assert errors == [(r, f"bad {r}") for r in bad]


def test_map_and_reduce_skip_only_failing_records() -> None:
    errors: list[Any] = []
    m = MapExecutor(lambda r: 10 // r, None, lambda r, e: errors.append(r))
    assert _run(m.process([1, 0, 2, 0, 5])) == [10, 5, 2]
    assert errors == [0, 0]
    red = ReduceExecutor(
        lambda acc, r: (acc or 0) + 1 // r,
        None,
        lambda r, e: errors.append(r),
        key_fn=lambda r: r % 2,
    )
    assert _run(red.process([1, 0, 1, 3])) == [(1, 1), (1, 2), (1, 2)]  # 1 // 3 == 0
    assert errors == [0, 0, 0] and red.snapshot() == {1: 2}


@pytest.mark.parametrize("kind", ["map", "filter", "flat_map"])
@pytest.mark.parametrize("n", [1, 31, 300, 1000])
def test_user_function_runs_once_per_record_when_one_raises(kind: str, n: int) -> None:
    """A side-effecting function must not run twice on the records before a failure."""
    calls: Counter[int] = Counter()
    errors: list[int] = []
    bad = {r for r in range(n) if r % 113 == 7} | {n - 1}

    def fn(r: int) -> Any:
        calls[r] += 1
        if r in bad:
            raise ValueError(r)
        if kind == "map":
            return r * 2
        if kind == "filter":
            return r % 2 == 0
        return [r, r]

    ex = {"map": MapExecutor, "filter": FilterExecutor, "flat_map": FlatMapExecutor}[kind](
        fn, None, lambda r, e: errors.append(r)
    )
    out = _run(ex.process(list(range(n))))
    good = [r for r in range(n) if r not in bad]
    expected = {
        "map": [r * 2 for r in good],
        "filter": [r for r in good if r % 2 == 0],
        "flat_map": [x for r in good for x in (r, r)],
    }[kind]
    assert out == expected
    assert errors == sorted(bad)
    assert set(calls) == set(range(n)) and max(calls.values()) == 1, "a record ran twice"


@pytest.mark.parametrize("kind", ["map", "filter", "flat_map", "sink", "reduce"])
@pytest.mark.parametrize("n", [1, 31, 33, 300, 1000])
def test_a_function_raising_stop_iteration_is_reported_not_the_end_of_the_batch(
    kind: str, n: int
) -> None:
    """StopIteration from user code ends ``map``/``filter`` as if the input had ended:
    the rest of the slice must still be processed and that record reported."""
    done: list[int] = []
    errors: list[tuple[int, str]] = []
    bad = {r for r in range(n) if r % 29 == 3} | {n - 1, 31, 255}

    def fn(r: int, *more: Any) -> Any:
        r = more[0] if kind == "reduce" else r
        if r in bad:
            next(iter(()))  # raises StopIteration
        done.append(r)
        return [r] if kind == "flat_map" else r if kind != "filter" else True

    cls = {
        "map": MapExecutor,
        "filter": FilterExecutor,
        "flat_map": FlatMapExecutor,
        "sink": SinkExecutor,
        "reduce": ReduceExecutor,
    }[kind]
    extra = {"key_fn": lambda r: r % 3} if kind == "reduce" else {}
    ex = cls(fn, None, lambda r, e: errors.append((r, str(e))), **extra)
    _run(ex.process(list(range(n))))
    assert done == [r for r in range(n) if r not in bad]
    assert errors == [(r, "the function raised StopIteration") for r in sorted(bad) if r < n]


@pytest.mark.parametrize("is_async", [False, True])
def test_a_sink_object_is_called_once_per_record_with_its_own_state(is_async: bool) -> None:
    """A sink given as an object with ``__call__`` (sync or async; the executor calls
    its bound method) sees every record once, keeps its state on the object, and its
    failures are reported like a function's."""

    class Counting:
        def __init__(self) -> None:
            self.seen: list[int] = []

        def __call__(self, r: int) -> None:
            if r == 3:
                raise ValueError("bad 3")
            self.seen.append(r)

    class AsyncCounting(Counting):
        async def __call__(self, r: int) -> None:  # type: ignore[override]
            Counting.__call__(self, r)

    sink = AsyncCounting() if is_async else Counting()
    errors: list[tuple[int, str]] = []
    ex = SinkExecutor(sink, None, lambda r, e: errors.append((r, str(e))))
    for start in (0, 10):
        _run(ex.process(list(range(start, start + 10))))
    assert sink.seen == [r for r in range(20) if r != 3]
    assert errors == [(3, "bad 3")]


class _Count:
    """A keyed class PE's state: key -> count; version 2 stores counts doubled."""

    state_version = 2

    def __init__(self) -> None:
        self.n: dict[Any, int] = {}
        self.restores = 0

    def process(self, r: Any) -> list[Any]:
        return []

    def snapshot(self) -> dict[Any, int]:
        return self.n

    def restore(self, state: dict[Any, int]) -> None:
        self.restores += 1
        self.n.update(state)

    def merge(self, state: dict[Any, int]) -> None:
        self.n.update(state)

    def migrate(self, state: dict[Any, int], from_version: int) -> dict[Any, int]:
        return {k: v * 2 for k, v in state.items()}


def test_keyed_restore_takes_dicts_pairs_and_envelopes_and_copies_the_handed_object() -> None:
    from hotwire.pe.executors import ProcessExecutor
    from hotwire.pe.state import REPLICATED_KEY, wrap

    class Ctx:
        key = None

    handed = {"a": 2, 7: 4}  # a same-worker handover passes this object itself
    states = [
        wrap(handed, 2),
        wrap([[["t", 1], 6], [REPLICATED_KEY, {"timers": []}]], 2),  # pairs, tuple key
        {"old": 5},  # version 1: migrated
    ]
    ex = ProcessExecutor(_Count, Ctx(), lambda r, e: None, key_fn=lambda r: r)
    ex.restore(states)
    obj = ex.obj
    assert obj.n == {"a": 2, 7: 4, ("t", 1): 6, "old": 10} and obj.restores == 1
    obj.n["a"] += 1
    assert handed == {"a": 2, 7: 4}, "the predecessor's object is left as it was"

    own = {"a": 2, 7: 4, REPLICATED_KEY: {"timers": []}}
    one = ProcessExecutor(_Count, Ctx(), lambda r, e: None, key_fn=lambda r: r)
    one.restore([wrap(own, 2)])
    one.obj.n["x"] = 1
    assert REPLICATED_KEY in own, "the instance's entry is taken from a copy"
    assert one.obj.n == {"a": 2, 7: 4, "x": 1}
    one.merge([wrap({"m": 1}, 2), [["p", 3]]])
    assert one.obj.n == {"a": 2, 7: 4, "x": 1, "m": 1, "p": 6}
