"""The PostgreSQL sink against a real server: two-phase commit, in-doubt resolution,
upserts, config refused at model time and at submit, exactly once on a real cluster."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from hotwire.connectors.postgres import PostgresSink
from hotwire.pe.executors import TransactionalSinkExecutor
from hotwire.sdk import Topology, ValidationError
from hotwire.testing import counter
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

N = 6000
KEYS = 16


def _sql(url: str, q: str, args: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(q, args)
        return cur.fetchall() if cur.description else []


def _prepared(url: str) -> list[str]:
    return [g for (g,) in _sql(url, "SELECT gid FROM pg_prepared_xacts")]


def _make_table(url: str) -> None:
    _sql(url, "CREATE TABLE counts (seq bigint, key text, n bigint, v int)")
    _sql(url, "CREATE TABLE latest (key text PRIMARY KEY, n bigint)")


def _ctx(url: str, **extra: Any) -> SimpleNamespace:
    config = {"url": url, "table": "counts", "columns": ["seq", "key"], **extra}
    return SimpleNamespace(app="a", pe="out", instance=0, config=config)


def test_prepared_transactions_commit_with_their_checkpoint_and_recovery_resolves_the_rest(
    pg_url: str,
) -> None:
    _make_table(pg_url)
    ctx = _ctx(pg_url)

    async def run() -> Any:
        ex = TransactionalSinkExecutor(PostgresSink, ctx, lambda r, e: None)
        await ex.setup()
        await ex.process([{"seq": 1, "key": "a"}, {"seq": 2, "key": "b"}])
        ex.pre_commit(1)
        await ex.process([{"seq": 3, "key": "a"}])
        ex.pre_commit(2)  # checkpoint 2 will hold this one
        state = ex.snapshot()
        await ex.process([{"seq": 4, "key": "a"}])
        ex.pre_commit(3)  # checkpoint 3 never completes
        assert _sql(pg_url, "SELECT count(*) FROM counts") == [(0,)]
        assert len(_prepared(pg_url)) == 3
        ex.checkpoint_complete(1)
        assert sorted(_sql(pg_url, "SELECT seq FROM counts")) == [(1,), (2,)]
        ex.checkpoint_complete(1)  # idempotent
        # The worker dies here (no teardown of the prepared ones): recovery from checkpoint 2.
        again = TransactionalSinkExecutor(PostgresSink, ctx, lambda r, e: None)
        await again.setup()
        again.restore([state])
        again.commit_all()
        await again.teardown()
        await ex.teardown()

    asyncio.run(run())
    assert sorted(_sql(pg_url, "SELECT seq FROM counts")) == [(1,), (2,), (3,)]
    assert _prepared(pg_url) == []


def test_upsert_mode_writes_the_last_value_per_key(pg_url: str) -> None:
    _make_table(pg_url)
    ctx = SimpleNamespace(
        app="a",
        pe="latest",
        instance=0,
        config={
            "url": pg_url,
            "table": "latest",
            "columns": ["key", "n"],
            "mode": "upsert",
            "key": ["key"],
        },
    )

    async def run() -> None:
        ex = TransactionalSinkExecutor(PostgresSink, ctx, lambda r, e: None)
        await ex.setup()
        await ex.process([{"key": "a", "n": 1}, {"key": "b", "n": 1}, {"key": "a", "n": 2}])
        ex.pre_commit(1)
        await ex.process([{"key": "a", "n": 2}, {"key": "b", "n": 2}])  # a replay of a
        await ex.teardown()

    asyncio.run(run())
    assert sorted(_sql(pg_url, "SELECT key, n FROM latest")) == [("a", 2), ("b", 2)]
    assert _prepared(pg_url) == []


def test_upsert_mode_writes_a_batch_at_once_and_reports_only_the_refused_row(
    pg_url: str,
) -> None:
    _make_table(pg_url)
    ctx = SimpleNamespace(
        app="a",
        pe="latest",
        instance=0,
        config={
            "url": pg_url,
            "table": "latest",
            "columns": ["key", "n"],
            "mode": "upsert",
            "key": ["key"],
        },
    )
    errors: list[tuple[Any, str]] = []

    async def run() -> None:
        ex = TransactionalSinkExecutor(
            PostgresSink, ctx, lambda r, e: errors.append((r, type(e).__name__))
        )
        await ex.setup()
        bad = {"key": "b", "n": "not a number"}
        await ex.process([{"key": "a", "n": 1}, bad, {"key": "c", "n": 3}])
        await ex.teardown()

    asyncio.run(run())
    assert sorted(_sql(pg_url, "SELECT key, n FROM latest")) == [("a", 1), ("c", 3)]
    assert errors == [({"key": "b", "n": "not a number"}, "InvalidTextRepresentation")]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"table": "t", "columns": ["a"]}, "config needs 'url'"),
        ({"url": "postgresql://h/db", "columns": ["a"]}, "config needs 'table'"),
        (
            {"url": "postgresql://h/db", "table": "t", "columns": ["a"], "tabel": "x"},
            "config has unknown option(s) 'tabel'; known: url, table, columns",
        ),
        (
            {"url": "http//nowhere", "table": "t", "columns": ["a"]},
            "config 'url' is not a PostgreSQL URL or conninfo",
        ),
        (
            {"url": "postgresql://h/db", "table": "t", "columns": ["a"], "mode": "upsert"},
            "config mode 'upsert' needs 'key'",
        ),
    ],
)
def test_bad_config_is_refused_by_the_model(config: dict[str, Any], problem: str) -> None:
    app = Topology("pg")
    app.source("src", counter(n=1)).sink("out", PostgresSink, config=config)
    with pytest.raises(
        ValidationError, match=re.escape(f"PE 'out' of app 'pg': PostgresSink {problem}")
    ):
        app.model()


def test_an_unreachable_server_refuses_setup_with_the_servers_error() -> None:
    ctx = _ctx("postgresql://nobody@127.0.0.1:1/db")
    with pytest.raises(
        ValueError, match=r"PE 'out' of app 'a': PostgresSink cannot connect: .*refused"
    ):
        PostgresSink().setup(ctx)


def _app(tmp_path: Path, name: str, url: str, v: int = 1, extra: str = "", rate: int = 2000) -> str:
    return write_app(
        tmp_path,
        f"{name}.py",
        f"""
        from hotwire import Topology
        from hotwire.connectors.postgres import PostgresSink
        from hotwire.sdk import ProcessPE
        from hotwire.testing import counter


        class Count(ProcessPE):
            def setup(self, ctx):
                self.n = {{}}

            def process(self, r):
                self.n[r["key"]] = self.n.get(r["key"], 0) + 1
                yield {{"seq": r["seq"], "key": r["key"], "n": self.n[r["key"]], "v": {v}}}

            def snapshot(self):
                return self.n

            def restore(self, state):
                self.n.update(state)


        app = Topology("pgcount")
        src = app.source("src", counter(n={N}, rate={rate}, keys={KEYS}))
        c = src.key_by(lambda r: r["key"]).process("count", Count, parallelism=2)
        c.sink("out", PostgresSink, parallelism=2, config={{
            "url": {url!r}, "table": "counts", "columns": ["seq", "key", "n", "v"]{extra}}})
        """,
    )


def _rows(url: str) -> list[tuple[Any, ...]]:
    return _sql(url, "SELECT seq, key, n, v FROM counts")


def _check_exactly_once(url: str) -> None:
    rows = _rows(url)
    seqs = Counter(r[0] for r in rows)
    assert len(rows) == N, (len(rows), [s for s, k in seqs.items() if k > 1][:10])
    assert set(seqs) == set(range(N)) and max(seqs.values()) == 1
    # Content: each key's count runs 1..K without a gap or repeat, K = its number of records.
    by_key: dict[str, list[int]] = {}
    for seq, key, n, _v in rows:
        assert key == f"k{seq % KEYS}"
        by_key.setdefault(key, []).append(n)
    for key, ns in by_key.items():
        assert sorted(ns) == list(range(1, len(ns) + 1)), key
    assert _prepared(url) == []


def test_a_worker_killed_under_load_leaves_every_row_exactly_once(
    tmp_path: Path, pg_url: str
) -> None:
    _make_table(pg_url)
    with LocalCluster(
        data_dir=tmp_path / "cluster", heartbeat_timeout=1.0, checkpoint_interval=0.3
    ) as c:
        # 6 s of records: time to catch w2's sink between a prepare and its commit
        # (a commit follows its prepare within a checkpoint interval).
        c.client.submit(_app(tmp_path, "app", pg_url, rate=1000))
        st = c.client.status("pgcount").apps[0]
        sink_workers = {i.worker for p in st.pes if p.name == "out" for i in p.instances}
        assert sink_workers == {"w1", "w2"}, "a sink instance must run on the killed worker"
        count = lambda: _sql(pg_url, "SELECT count(*) FROM counts")[0][0]  # noqa: E731
        poll_for(lambda: count() > N // 6, 30, what="commits")
        # Kill w2 while its sink instance holds a prepared, uncommitted transaction:
        # freeze it (SIGSTOP) when one is seen, check it is still there, then SIGKILL.
        (index,) = [
            i.index for p in st.pes if p.name == "out" for i in p.instances if i.worker == "w2"
        ]

        def mine() -> list[str]:
            return [g for g in _prepared(pg_url) if g.startswith(f"hotwire/pgcount/out/{index}/")]

        for _ in range(50):
            poll_for(mine, 10, 0.002, what="a prepared transaction of w2's sink")
            c.pause_worker("w2")
            in_doubt = mine()
            if in_doubt:
                break
            c.resume_worker("w2")
        assert in_doubt, "w2 never froze with a prepared transaction"
        c.kill_worker("w2")
        poll_for(lambda: count() >= N, 60, what="every row committed")
        poll_for(lambda: not _prepared(pg_url), 10, what="no prepared transaction left")
    _check_exactly_once(pg_url)


def test_an_online_upgrade_of_the_sink_keeps_exactly_once(tmp_path: Path, pg_url: str) -> None:
    _make_table(pg_url)
    v1 = _app(tmp_path, "v1", pg_url, v=1)
    # v2 replaces the count PE's code and the sink's (another mode value spelled out).
    v2 = _app(tmp_path, "v2", pg_url, v=2, extra=', "mode": "exactly_once"')
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(v1)
        count = lambda: _sql(pg_url, "SELECT count(*) FROM counts")[0][0]  # noqa: E731
        poll_for(lambda: count() > N // 4, 30, what="commits")
        res = c.client.upgrade(v2)
        assert res.applied
        out = next(p for p in c.client.status("pgcount").apps[0].pes if p.name == "out")
        assert out.gen == 2, "the sink PE was replaced"
        poll_for(lambda: count() >= N, 60, what="every row committed")
        poll_for(lambda: not _prepared(pg_url), 10, what="no prepared transaction left")
    _check_exactly_once(pg_url)
    assert {r[3] for r in _rows(pg_url)} == {1, 2}


def test_bad_config_and_an_unreachable_server_are_refused_at_submit(
    tmp_path: Path, pg_url: str
) -> None:
    _make_table(pg_url)
    with LocalCluster(data_dir=tmp_path / "cluster") as c:
        bad = _app(tmp_path, "bad", pg_url, extra=', "tabel": "x"')
        res = c.streamctl("submit", bad)
        assert res.returncode != 0
        assert "unknown option(s) 'tabel'" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        bad_url = _app(tmp_path, "bad_url", "http//nowhere")
        res = c.streamctl("submit", bad_url)
        assert res.returncode != 0 and "is not a PostgreSQL URL" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not c.client.status().apps, "nothing deployed"
        down = _app(tmp_path, "down", "postgresql://postgres@127.0.0.1:1/postgres")
        res = c.streamctl("submit", down)
        assert res.returncode != 0
        assert "PostgresSink cannot connect" in res.stderr and "refused" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not [a for a in c.client.status().apps if a.state not in ("FAILED", "KILLED")]
