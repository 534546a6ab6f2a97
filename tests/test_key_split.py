"""The key split on the record path (``RouteState.emit`` with ``partition="key"``)
sends each record to the instance :func:`hotwire.plan.key_partition` names, the one
a retiring instance's state split and a checkpoint's cut use: for keys of every
type, keys equal across types (1, 1.0, True hash alike but pack differently), long
strings, repeat batches (the kept hashes), and after the kept hashes are dropped."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import pytest

from hotwire.plan import Route, Target, key_partition, pack_key
from hotwire.worker import channels
from hotwire.worker.channels import RouteState


class _Sink:
    local = False  # a remote channel, as RouteState sees it

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.stamps: set[float | None] = set()

    async def send(self, records: list[Any], t: float | None = None) -> None:
        self.records.extend(records)
        self.stamps.add(t)


KEYS: list[Any] = [
    1,
    1.0,
    True,
    False,
    0,
    "1",
    b"1",
    None,
    -(2**40),
    2**63 - 1,
    -(2**63),
    (1, "a"),
    "x" * 65,
    "x" * 64,
    "",
    "ключ",
    *range(200),
    *(f"k{i}" for i in range(200)),
]


@pytest.mark.parametrize("n", [2, 3, 7])
def test_every_record_goes_where_key_partition_says(n: int, monkeypatch: Any) -> None:
    monkeypatch.setattr(channels, "_MEMO_KEYS", 150)  # dropped within the first batch
    sinks = [_Sink() for _ in range(n)]
    targets = tuple(Target(f"c{i}", f"m@1.{i}", "w") for i in range(n))
    rs = RouteState(Route("m", "key", targets), sinks, lambda r: r[0])  # type: ignore[arg-type]
    records = [(k, i) for i, k in enumerate(KEYS)]

    async def go() -> None:
        for _ in range(3):  # the kept hashes: none, some, and dropped again
            await rs.emit(list(records), 12.5)

    asyncio.run(go())
    for i, sink in enumerate(sinks):
        assert sink.stamps == {12.5}, "every part keeps the batch's source time"
        for k, _ in sink.records:
            assert key_partition(k, n) == i, (k, i)
    got = sorted((r for s in sinks for r in s.records), key=lambda r: r[1])
    assert got == sorted(records * 3, key=lambda r: r[1])


def test_keys_equal_across_types_hash_apart() -> None:
    """What makes the cases above telling: 1, 1.0 and True are one dict key, but not
    one hash."""
    hashes = {zlib.crc32(pack_key(k)) for k in (1, 1.0, True)}
    assert len(hashes) == 3
