"""The PostgreSQL sink writes an epoch's rows while the epoch runs (COPY into its open
transaction, ``STREAM_ROWS`` at a time): against a real server, every row is
invisible until its checkpoint completes and then there once, whatever its content,
across a lost connection, a refused row and a handed-over commit."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from hotwire.connectors.postgres import STREAM_ROWS, PostgresSink
from hotwire.pe.executors import TransactionalSinkExecutor

COLUMNS = ["seq", "key", "note", "k"]
ODD = ["", "ключ ✓ 键", "tab\there", "new\nline", "back\\slash", "quote ' \" ,", "\\N", None]


def _sql(url: str, q: str, args: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(q, args)
        return cur.fetchall() if cur.description else []


def _table(url: str) -> None:
    _sql(url, "CREATE TABLE rows (seq bigint, key text, note text, k int)")


def _ctx(url: str, instance: int = 0) -> SimpleNamespace:
    config = {"url": url, "table": "rows", "columns": COLUMNS}
    return SimpleNamespace(app="a", pe="out", instance=instance, config=config)


def _record(seq: int) -> dict[str, Any]:
    """Unusual content: None fields, unicode, COPY's special characters, int keys."""
    return {
        "seq": seq,
        "key": ODD[seq % len(ODD)],
        "note": None if seq % 3 == 0 else f"n{seq}-{ODD[(seq // 7) % len(ODD)]}",
        "k": None if seq % 5 == 0 else seq % 97,
    }


def _expected(seqs: range) -> list[tuple[Any, ...]]:
    return sorted((tuple(_record(s)[c] for c in COLUMNS) for s in seqs), key=lambda r: r[0])


def _committed(url: str) -> list[tuple[Any, ...]]:
    return sorted(_sql(url, "SELECT seq, key, note, k FROM rows"), key=lambda r: r[0])


def _prepared(url: str) -> list[str]:
    return [g for (g,) in _sql(url, "SELECT gid FROM pg_prepared_xacts")]


async def _feed(ex: TransactionalSinkExecutor, seqs: range, batch: int = 500) -> None:
    for start in range(seqs.start, seqs.stop, batch):
        await ex.process([_record(s) for s in range(start, min(seqs.stop, start + batch))])


def _sink(ex: TransactionalSinkExecutor) -> Any:
    return ex.obj


def test_rows_go_in_while_the_epoch_runs_invisible_until_the_checkpoint_completes(
    pg_url: str,
) -> None:
    _table(pg_url)
    epoch = 3 * STREAM_ROWS + 123  # several writes during the epoch, the rest at the barrier

    async def run() -> None:
        ex = TransactionalSinkExecutor(PostgresSink, _ctx(pg_url), lambda r, e: None)
        await ex.setup()
        for cid in (1, 2, 3):
            first = (cid - 1) * epoch
            await _feed(ex, range(first, first + epoch))
            sent = _sink(ex)._sent
            assert sent >= 2 * STREAM_ROWS, f"epoch {cid}: {sent} rows written during it"
            assert len(_committed(pg_url)) == first, "rows of an open epoch are invisible"
            await ex.apre_commit(cid)
            assert len(_committed(pg_url)) == first, "prepared rows are invisible"
            await ex.acheckpoint_complete(cid)
            assert _committed(pg_url) == _expected(range(first + epoch))
        await ex.teardown()

    asyncio.run(run())
    assert _prepared(pg_url) == []


def test_a_connection_lost_mid_epoch_writes_the_whole_epoch_on_the_next_one(
    pg_url: str,
) -> None:
    _table(pg_url)
    n = 2 * STREAM_ROWS + 777

    async def run() -> None:
        ex = TransactionalSinkExecutor(PostgresSink, _ctx(pg_url), lambda r, e: None)
        await ex.setup()
        await _feed(ex, range(STREAM_ROWS + 10))
        assert _sink(ex)._sent > 0
        pid = _sink(ex).conn.info.backend_pid
        assert _sql(pg_url, "SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
        await _feed(ex, range(STREAM_ROWS + 10, n))  # the write fails, then is retried
        await ex.apre_commit(1)
        assert _sink(ex).conn.info.backend_pid != pid, "a new connection was made"
        await ex.acheckpoint_complete(1)
        await ex.teardown()

    asyncio.run(run())
    assert _committed(pg_url) == _expected(range(n))
    assert _prepared(pg_url) == []


def test_a_refused_row_fails_the_barrier_and_leaves_nothing(pg_url: str) -> None:
    _sql(pg_url, "CREATE TABLE rows (seq bigint, key text, note text, k int NOT NULL)")

    async def run() -> None:
        ex = TransactionalSinkExecutor(PostgresSink, _ctx(pg_url), lambda r, e: None)
        await ex.setup()
        await _feed(ex, range(2 * STREAM_ROWS))  # k is None in every fifth row
        assert _sink(ex)._stream is False, "the write during the epoch was refused"
        with pytest.raises(psycopg.errors.NotNullViolation, match='"k"'):
            await ex.apre_commit(1)
        assert ex.pending == []
        await ex.teardown()

    asyncio.run(run())
    assert _committed(pg_url) == []
    assert _prepared(pg_url) == []


def test_a_handed_over_transaction_commits_while_rows_are_written(pg_url: str) -> None:
    _table(pg_url)
    a, b = range(0, 1000), range(1000, 1000 + 2 * STREAM_ROWS + 5)

    async def run() -> None:
        old = TransactionalSinkExecutor(PostgresSink, _ctx(pg_url), lambda r, e: None)
        await old.setup()
        await _feed(old, a)
        await old.apre_commit(1)
        state = old.snapshot()  # handed over with its pending transaction
        await old.teardown()
        new = TransactionalSinkExecutor(PostgresSink, _ctx(pg_url), lambda r, e: None)
        await new.setup()
        new.restore([state])
        await _feed(new, b)
        assert _sink(new)._sent > 0 and _sink(new)._open is not None
        await new.acheckpoint_complete(1)  # the predecessor's transaction commits now
        assert _committed(pg_url) == _expected(a)
        await new.apre_commit(2)
        await new.acheckpoint_complete(2)
        await new.teardown()

    asyncio.run(run())
    assert _committed(pg_url) == _expected(range(b.stop))
    assert _prepared(pg_url) == []


def test_an_abandoned_epoch_is_rolled_back_before_the_next_begins(pg_url: str) -> None:
    _table(pg_url)
    sink = PostgresSink()
    sink.setup(_ctx(pg_url))
    try:
        sink.begin("t1")
        for s in range(STREAM_ROWS):
            sink.write(_record(s))
        assert sink.flush_due()
        sink.flush()
        sink.abort()  # its rows are gone; the transaction is still open on the connection
        sink.begin("t2")
        for s in range(STREAM_ROWS, STREAM_ROWS + 10):
            sink.write(_record(s))
        handle = sink.pre_commit()
        sink.commit(handle)
    finally:
        sink.teardown()
    assert _committed(pg_url) == _expected(range(STREAM_ROWS, STREAM_ROWS + 10))
    assert _prepared(pg_url) == []


class _Dict(dict):  # a dict subclass: rows are built by the general path
    pass


def test_missing_columns_extra_keys_dict_subclasses_and_one_column_rows(pg_url: str) -> None:
    _table(pg_url)
    _sql(pg_url, "CREATE TABLE one (seq bigint)")
    errors: list[tuple[Any, str]] = []
    records: list[Any] = [
        {"seq": 1},  # the other columns missing: NULL
        {"seq": 2, "key": "b", "note": "x", "k": 7, "extra": "ignored"},
        _Dict(seq=3, key="ключ", k=1),
        ["not", "a", "dict"],  # refused, to the PE's error policy
        {"key": "no seq", "note": None, "k": None},
    ]

    async def run() -> None:
        for ctx in (_ctx(pg_url), _ctx(pg_url, instance=1)):
            if ctx.instance == 1:
                ctx.config = {"url": pg_url, "table": "one", "columns": ["seq"]}
            ex = TransactionalSinkExecutor(
                PostgresSink, ctx, lambda r, e: errors.append((r, type(e).__name__))
            )
            await ex.setup()
            await ex.process(records * (STREAM_ROWS // len(records) + 1))  # streamed
            await ex.apre_commit(1)
            await ex.acheckpoint_complete(1)
            await ex.teardown()

    asyncio.run(run())
    k = STREAM_ROWS // len(records) + 1
    expected = [(1, None, None, None), (2, "b", "x", 7), (3, "ключ", None, 1)]
    expected += [(None, "no seq", None, None)]
    got = _sql(pg_url, "SELECT seq, key, note, k FROM rows")
    assert sorted(got, key=str) == sorted(expected * k, key=str)
    assert sorted(_sql(pg_url, "SELECT seq FROM one"), key=str) == sorted(
        [(1,), (2,), (3,), (None,)] * k, key=str
    )
    assert errors == [(["not", "a", "dict"], "TypeError")] * (2 * k)


def test_a_held_worker_s_sink_prepares_nothing_until_released(pg_url: str) -> None:
    """A worker that stood still past the heartbeat timeout may have been declared dead,
    its sink instance restarted elsewhere and what it left rolled back: a transaction
    it prepared then would stay in doubt. The barrier's pre-commit waits for the hold."""
    from hotwire.worker.fence import OutputHold

    _table(pg_url)
    hold = OutputHold("w1")
    ctx = _ctx(pg_url)
    ctx.hold = hold

    async def run() -> None:
        ex = TransactionalSinkExecutor(PostgresSink, ctx, lambda r, e: None)
        await ex.setup()
        await _feed(ex, range(0, 100))
        hold.suspect("it did not run for 1.5 s")  # as after a SIGSTOP
        prepare = asyncio.ensure_future(ex.apre_commit(1))
        for _ in range(200):  # until it waits on the hold (or, wrongly, prepared)
            if prepare.done() or hold._waiters:
                break
            await asyncio.sleep(0.01)
        assert not prepare.done(), "the sink prepared while its worker held its output"
        assert _prepared(pg_url) == [] and ex.pending == []
        hold.release("the master answered: the session is current")
        await asyncio.wait_for(prepare, 30)
        assert len(_prepared(pg_url)) == 1 and len(ex.pending) == 1
        await ex.acheckpoint_complete(1)
        assert _prepared(pg_url) == []
        await ex.teardown()

    asyncio.run(run())
    assert _committed(pg_url) == _expected(range(0, 100))
