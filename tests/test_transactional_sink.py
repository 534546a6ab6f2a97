"""Exactly-once output through a transactional sink, across worker failures and upgrades."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from hotwire.pe.executors import TransactionalSinkExecutor
from hotwire.sinks import JsonlSink, read_committed
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

N = 9000


def _app(tmp_path: Path, name: str, out: Path, v: int = 1, sink_p: int = 2) -> str:
    return write_app(
        tmp_path,
        f"{name}.py",
        f"""
        from hotwire import Topology
        from hotwire.sinks import JsonlSink
        from hotwire.testing import counter

        app = Topology("txn")
        src = app.source("src", counter(n={N}, rate=3000, keys=16))
        m = src.key_by(lambda r: r["key"]).map("m", lambda r: {{**r, "v": {v}}}, parallelism=2)
        m.sink("out", JsonlSink, parallelism={sink_p}, config={{"dir": {str(out)!r}}})
        """,
    )


def _committed_seqs(out: Path) -> Counter[int]:
    return Counter(r["seq"] for r in read_committed(out)) if out.exists() else Counter()


def test_a_worker_killed_under_load_leaves_no_duplicate_and_no_gap(tmp_path: Path) -> None:
    out = tmp_path / "out"
    app = _app(tmp_path, "app", out)
    with LocalCluster(
        data_dir=tmp_path / "cluster", heartbeat_timeout=1.0, checkpoint_interval=0.3
    ) as c:
        c.client.submit(app)
        st = c.client.status("txn").apps[0]
        sink_workers = {i.worker for p in st.pes if p.name == "out" for i in p.instances}
        assert sink_workers == {"w1", "w2"}, "a sink instance must run on the killed worker"
        poll_for(lambda: sum(_committed_seqs(out).values()) > N // 3, 20, what="commits")
        c.kill_worker("w2")
        poll_for(lambda: len(_committed_seqs(out)) >= N, 40, what="every record committed")
    seqs = _committed_seqs(out)
    assert set(seqs) == set(range(N))
    assert max(seqs.values()) == 1, [s for s, k in seqs.items() if k > 1][:10]


def test_an_online_upgrade_and_rescale_of_the_sink_keep_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    v1 = _app(tmp_path, "v1", out, v=1, sink_p=1)
    v2 = _app(tmp_path, "v2", out, v=2, sink_p=3)
    with LocalCluster(data_dir=tmp_path / "cluster", checkpoint_interval=0.3) as c:
        c.client.submit(v1)
        poll_for(lambda: sum(_committed_seqs(out).values()) > N // 4, 20, what="commits")
        assert c.client.upgrade(v2).applied
        poll_for(lambda: len(_committed_seqs(out)) >= N, 30, what="every record committed")
    seqs = _committed_seqs(out)
    assert set(seqs) == set(range(N)) and max(seqs.values()) == 1
    rows = read_committed(out)
    assert {r["v"] for r in rows} == {1, 2}


def test_jsonl_sink_commits_only_what_a_complete_checkpoint_covers(tmp_path: Path) -> None:
    import asyncio

    ctx = SimpleNamespace(app="a", pe="out", instance=0, config={"dir": str(tmp_path)})
    ex = TransactionalSinkExecutor(JsonlSink, ctx, lambda r, e: None)

    async def run() -> None:
        await ex.setup()
        await ex.process([{"seq": 1}, {"seq": 2}])
        ex.pre_commit(1)  # barrier 1
        await ex.process([{"seq": 3}])
        ex.pre_commit(2)  # barrier 2: checkpoint 2 never completes
        await ex.process([{"seq": 4}])
        assert read_committed(tmp_path) == []
        ex.checkpoint_complete(1)
        assert [r["seq"] for r in read_committed(tmp_path)] == [1, 2]
        state = ex.snapshot()
        ex.checkpoint_complete(1)  # idempotent
        await ex.teardown()  # the open transaction (seq 4) is aborted
        # A recovery from checkpoint 2's state commits what it holds, again idempotently.
        again = TransactionalSinkExecutor(JsonlSink, ctx, lambda r, e: None)
        await again.setup()
        again.restore([state, state])
        again.commit_all()
        await again.teardown()

    asyncio.run(run())
    assert [r["seq"] for r in read_committed(tmp_path)] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp"))


def test_jsonl_sink_needs_a_directory() -> None:
    ctx = SimpleNamespace(app="a", pe="out", instance=0, config={})
    with pytest.raises(ValueError, match=r"PE 'out': JsonlSink needs config=\{'dir': DIRECTORY\}"):
        JsonlSink().setup(ctx)
