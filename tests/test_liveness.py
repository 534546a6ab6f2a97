"""Liveness and limits of the control plane on a real local cluster.

* A worker's heartbeats do not depend on user code: a map that blocks the
  worker's event loop for longer than the heartbeat timeout does not get the
  worker declared dead.
* An app bundle bigger than gRPC's default 4 MiB message limit reaches the workers.
* The master answers while its SQLite store is slow (a write waiting on a lock),
  and still replies to a submit only after the version is recorded.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from hotwire.testing import read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, wait_until, write_app


def _seqs(path: Path) -> Counter[int]:
    return Counter(int(r["seq"]) for r in read_jsonl(path))


def test_a_user_call_longer_than_the_heartbeat_timeout_does_not_kill_the_worker(
    tmp_path: Path,
) -> None:
    n, slow_at, sleep_s, timeout = 3000, 1000, 4.0, 1.5
    started, finished = tmp_path / "started", tmp_path / "finished"
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        import time
        from pathlib import Path
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        def slow_once(r):
            # Blocks the worker's event loop: a plain sync call, no await.
            if r["seq"] == {slow_at} and not Path({str(started)!r}).exists():
                Path({str(started)!r}).touch()
                time.sleep({sleep_s})
                Path({str(finished)!r}).touch()
            return r

        app = Topology("sleepy")
        src = app.source("src", counter(n={n}, rate=1000))
        src.map("m", slow_once).sink("out", file_sink({str(out)!r}))
        """,
    )
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=timeout) as c:
        c.client.submit(app)
        poll_for(started.exists, 20, what="the map to start its long call")
        names = {w.name for w in c.client.workers().workers}
        assert names == {"w1", "w2"}
        ages: list[float] = []
        dead: list[tuple[float, str]] = []
        t0 = time.monotonic()

        def observe() -> bool:
            for w in c.client.workers().workers:
                ages.append(w.last_heartbeat_age_s)
                if not w.alive:
                    dead.append((time.monotonic() - t0, w.name))
            return finished.exists()

        poll_for(observe, sleep_s + 15, interval=0.05, what="the long call to finish")
        # Heartbeats kept coming while the loop was blocked; every worker stayed alive.
        assert not dead, f"workers declared dead during the long call: {dead[:3]}..."
        assert len(ages) > 20 and max(ages) < timeout, f"heartbeat ages up to {max(ages):.2f}s"
        poll_for(lambda: set(_seqs(out)) >= set(range(n)), 30, what="every record at the sink")
        st = c.client.status("sleepy").apps[0]
        assert st.recoveries == 0, "the app was restarted elsewhere"
        assert {w.name for w in c.client.workers().workers if w.alive} == {"w1", "w2"}
        seqs = _seqs(out)
        assert set(seqs) == set(range(n))
        dups = {s: k for s, k in seqs.items() if k > 1}
        assert not dups, f"{len(dups)} records arrived more than once"


def test_an_app_bundle_over_grpcs_default_message_limit_runs(tmp_path: Path) -> None:
    n = 500
    blob = tmp_path / "blob"
    blob.mkdir()
    size = 10 * 1024 * 1024  # random bytes do not compress: the bundle is ~10 MiB
    (blob / "data.bin").write_bytes(os.urandom(size))
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from pathlib import Path
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        SIZE = (Path(__file__).parent / "blob" / "data.bin").stat().st_size

        def tag(r):
            return {{"seq": r["seq"], "size": SIZE}}

        app = Topology("big")
        app.source("src", counter(n={n})).map("m", tag, parallelism=2).sink(
            "out", file_sink({str(out)!r})
        )
        """,
    )
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=3.0) as c:
        reply = c.client.submit(app, include=str(blob))
        assert reply.version == 1
        poll_for(lambda: len(read_jsonl(out)) >= n, 30, what="every record at the sink")
        rows = read_jsonl(out)
        assert sorted(r["seq"] for r in rows) == list(range(n))
        # Every map instance read the included file from the bundle it was given.
        assert {r["size"] for r in rows} == {size}
        st = c.client.status("big").apps[0]
        assert {i.worker for p in st.pes for i in p.instances} == {"w1", "w2"}


def test_the_master_answers_while_its_store_waits_and_replies_after_the_commit(
    tmp_path: Path,
) -> None:
    n, hold_s = 300, 2.5
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology("slowdisk")
        app.source("src", counter(n={n})).sink("out", file_sink({str(out)!r}))
        """,
    )
    with LocalCluster(workers=1, data_dir=tmp_path / "c", heartbeat_timeout=3.0) as c:
        db = sqlite3.connect(str(c.dir / "master" / "hotwire.db"), isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # take the write lock: the master's writes wait
            result: dict[str, Any] = {}

            def submit() -> None:
                try:
                    result["reply"] = c.client.submit(app)
                except Exception as e:  # reported by the assertion below
                    result["error"] = e

            t = threading.Thread(target=submit)
            t.start()
            latencies: list[float] = []
            alive: list[bool] = []
            release_at = time.monotonic() + hold_s
            while time.monotonic() < release_at:
                t1 = time.monotonic()
                workers = c.client.workers(timeout=10).workers
                latencies.append(time.monotonic() - t1)
                alive += [w.alive for w in workers]
            assert max(latencies) < 1.0, f"the master stalled for {max(latencies):.2f}s"
            assert all(alive), "the worker's heartbeats went unanswered"
            # The submit has not been answered: its version is not recorded yet.
            assert t.is_alive(), f"the submit was answered before its commit: {result}"
            db.execute("ROLLBACK")
            t.join(30)
            assert not t.is_alive() and "reply" in result, result
            assert result["reply"].version == 1
            rows = db.execute("SELECT app, version, state FROM apps").fetchall()
            assert rows == [("slowdisk", 1, "running")]
        finally:
            db.close()
        poll_for(lambda: len(read_jsonl(out)) >= n, 30, what="every record at the sink")
        assert sorted(r["seq"] for r in read_jsonl(out)) == list(range(n))


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hotwire-heartbeat-")]


async def test_a_forgotten_session_registers_again_and_the_heartbeat_thread_stops(
    tmp_path: Path,
) -> None:
    from hotwire.master.service import Master
    from hotwire.proto import hotwire_pb2 as pb
    from hotwire.proto import hotwire_pb2_grpc as pb_grpc
    from hotwire.worker.daemon import Worker

    assert not _heartbeat_threads()
    master = Master(listen="127.0.0.1:0", data_dir=tmp_path / "m", heartbeat_timeout=2.0)
    await master.start()
    worker = Worker(master=master.address, name="w1", data_dir=tmp_path / "w1")
    try:
        await worker.start()
        assert [t.name for t in _heartbeat_threads()] == ["hotwire-heartbeat-w1"]
        first = worker.session
        # Another registration under the worker's name wins: the master forgets the
        # worker's session, its next heartbeat is answered NOT_FOUND, and it registers again.
        async with grpc.aio.insecure_channel(master.address) as channel:
            other = await pb_grpc.WorkerControlStub(channel).Register(
                pb.RegisterRequest(name="w1", data_address="127.0.0.1:1", slots=1), timeout=5
            )
        await wait_until(
            lambda: (
                worker.session not in ("", first, other.session)
                and master.membership.workers["w1"].session == worker.session
                and master.membership.workers["w1"].data_address == worker.data_address
            ),
            10,
            "the worker to register again",
        )
        seen = master.membership.workers["w1"].last_seen
        await wait_until(lambda: master.membership.workers["w1"].last_seen > seen, 5, "a heartbeat")
        assert master.membership.alive("w1")
    finally:
        await worker.close()
        await master.close()
    assert not _heartbeat_threads(), "the heartbeat thread outlived its worker"
