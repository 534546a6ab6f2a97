"""Lost data links between workers, for real: every worker sits behind a TCP proxy.

Each worker advertises its proxy's address (``--advertise``), so every
connection between the two workers passes through a proxy that the test resets
(both ends get a TCP reset; whatever the proxy had read and not yet forwarded is
lost) or blocks. Heartbeats to the master go around the proxies and stay healthy.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import SCENARIOS, check_output, render

N = 15000
RATE = 3000.0


def _workers_of(c: LocalCluster, app: str) -> set[str]:
    return {i.worker for p in c.client.status(app).apps[0].pes for i in p.instances}


def _assert_healthy(c: LocalCluster, app: str) -> None:
    dead = [p.label for p in [c.master, *c.workers] if p is not None and p.proc.poll() is not None]
    assert not dead, f"processes died: {dead}\n{c.logs()}"
    failed = [
        (p.name, i.index, i.error)
        for p in c.client.status(app).apps[0].pes
        for i in p.instances
        if i.failed
    ]
    assert not failed, failed


def _wait_all(out: Path, n: int, timeout: float) -> str:
    """'' once ``n`` lines are at the sink, else what the sink had (a stall)."""
    try:
        poll_for(lambda: count_lines(out) >= n, timeout, what="every record at the sink")
    except TimeoutError:
        return f"stalled: {count_lines(out)} of {n} records at the sink after {timeout} s"
    return ""


def _assert_exactly_once(out: Path, timeout: float, detail: str) -> None:
    """Every record 0..N-1 at the sink once, in order per key, no state reset."""
    stalled = _wait_all(out, N, timeout)
    v = check_output(read_jsonl(out), N)
    counts = (v.lost, v.duplicated, v.out_of_order, v.state_resets)
    assert not stalled and counts == (0, 0, 0, 0) and not v.problems, (
        f"{stalled or 'all arrived'}; lost/dup/out-of-order/state resets {counts}; "
        f"{v.problems}; {detail}"
    )


def test_links_cut_under_load_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    v1, _ = SCENARIOS["change_code"]
    app = write_app(
        tmp_path, "app.py", render(v1, out=str(out), audit=str(tmp_path / "a"), n=N, rate=RATE)
    )
    # Every hop through a proxy takes 20 ms (a long link), so a cut loses what is in flight.
    with LocalCluster(
        data_dir=tmp_path / "cluster", heartbeat_timeout=3.0, proxy_data=True, data_delay=0.02
    ) as c:
        c.client.submit(app)
        assert _workers_of(c, "upg") == {"w1", "w2"}, "the app must span both workers"
        cuts = []
        for k in range(1, 6):
            at = k * N // 7
            poll_for(lambda at=at: count_lines(out) >= at, 30, what=f"records before cut {k}")
            cuts.append(c.cut_links())
        _assert_exactly_once(out, 30, f"connections reset per cut {cuts}\n{c.logs()}")
        assert all(cuts), f"a cut found no connection to reset: {cuts}"
        _assert_healthy(c, "upg")
        logs = "".join(w.log_path.read_text() for w in c.workers)
        assert "data link to worker" in logs and "up again" in logs, logs[-3000:]


def test_links_cut_during_an_upgrade_with_state_handover(tmp_path: Path) -> None:
    # rescale_keyed: the counting PE goes from 2 to 3 instances, then back; its keyed
    # state is split and handed over, partly to instances on the other worker.
    out = tmp_path / "out.jsonl"
    v1, v2 = SCENARIOS["rescale_keyed"]
    kw: dict[str, Any] = {"out": str(out), "audit": str(tmp_path / "a"), "n": N, "rate": RATE}
    app1 = write_app(tmp_path, "v1.py", render(v1, **kw))
    app2 = write_app(tmp_path, "v2.py", render(v2, **kw))
    # A STATE frame names its stream ">" + the successor instance, e.g. ">count@2.1": as
    # msgpack, a 10-character string. The proxies cut the link when one goes by, and
    # the frame is lost with the connection.
    handover = msgpack.packb(">count@2.1")[:-3]
    # Checkpoints only after each commit (checkpoint_interval=0), and each upgrade
    # waits for the one after the previous commit: no checkpoint is in flight across
    # a switch, so what is tested is the links.
    with LocalCluster(
        data_dir=tmp_path / "cluster",
        heartbeat_timeout=3.0,
        checkpoint_interval=0,
        proxy_data=True,
        data_delay=0.01,
    ) as c:
        c.client.submit(app1)
        poll_for(lambda: count_lines(out) > N // 4, 30, what="records before the upgrades")
        cuts, state_cuts = 0, []
        for path, version in ((app2, 2), (app1, 3)):  # rescale 2 -> 3, then back to 2
            poll_for(
                lambda: c.client.status("upg").apps[0].last_checkpoint > 0,
                20,
                what="the checkpoint after the last commit",
            )
            before = sum(p.pattern_cuts for p in c.data_proxies.values())
            for proxy in c.data_proxies.values():
                proxy.cut_on(handover)
            result: dict[str, Any] = {}

            def upgrade(path: str = path, result: dict[str, Any] = result) -> None:
                try:
                    result["reply"] = c.client.upgrade(path)
                except Exception as e:  # reported below
                    result["error"] = e

            t = threading.Thread(target=upgrade)
            t.start()
            while t.is_alive():
                cuts += c.cut_links()  # and cut everything every 200 ms until it returns
                t.join(0.2)
            assert "error" not in result, f"{result['error']}\n{c.logs()}"
            assert result["reply"].applied and result["reply"].to_version == version
            for proxy in c.data_proxies.values():
                proxy.cut_on(b"")
            state_cuts.append(sum(p.pattern_cuts for p in c.data_proxies.values()) - before)
        assert count_lines(out) < N, "the upgrades must happen while records flow"
        _assert_exactly_once(
            out, 40, f"{cuts} connections reset, {state_cuts} on a handover\n{c.logs()}"
        )
        assert all(state_cuts), f"links cut on a handover, per upgrade: {state_cuts}"
        _assert_healthy(c, "upg")
        logs = "".join(w.log_path.read_text() for w in c.workers)
        assert re.search(r"resent \d+ frames \([1-9]\d* state handovers\)", logs), logs[-3000:]


def test_a_peer_unreachable_past_the_bound_restarts_the_app(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    v1, _ = SCENARIOS["change_code"]
    n = 12000
    app = write_app(
        tmp_path, "app.py", render(v1, out=str(out), audit=str(tmp_path / "a"), n=n, rate=2000)
    )
    with LocalCluster(
        data_dir=tmp_path / "cluster",
        heartbeat_timeout=2.0,
        proxy_data=True,
        link_timeout=3.0,
    ) as c:
        c.client.submit(app)
        assert _workers_of(c, "upg") == {"w1", "w2"}
        poll_for(
            lambda: (
                c.client.status("upg").apps[0].last_checkpoint > 0 and count_lines(out) > n // 5
            ),
            30,
            what="a checkpoint and records before the links go down",
        )
        c.block_links()  # the workers cannot reach each other; heartbeats go on
        st = poll_for(
            lambda: (a := c.client.status("upg").apps[0]).recoveries >= 1 and a,
            30,
            what="the app restarted from its checkpoint",
        )
        assert "could not reach each other" in st.last_recovery, st.last_recovery
        assert len(_workers_of(c, "upg")) == 1, "the restarted app must not span the broken link"
        try:  # at-least-once: records after the checkpoint come twice
            poll_for(
                lambda: {r["seq"] for r in read_jsonl(out)} >= set(range(n)),
                40,
                interval=0.2,
                what="every record at the sink",
            )
        except TimeoutError:
            pass
        seqs = Counter(r["seq"] for r in read_jsonl(out))
        assert set(seqs) == set(range(n)), (n - len(seqs), "records missing", c.logs())
        v = check_output(read_jsonl(out), n)
        assert v.state_resets == 0 and not v.problems, v  # state came from the checkpoint
        _assert_healthy(c, "upg")
        assert c.live_workers() == 2, "no worker may be declared dead: only the link broke"
        shown = json.loads(c.streamctl("status", "upg", "--json").stdout)
        assert "could not reach each other" in shown["last_recovery"], shown
        master_log = c.master.log_path.read_text() if c.master else ""
        assert "could not reach each other" in master_log, master_log[-3000:]
        worker_logs = "".join(w.log_path.read_text() for w in c.workers)
        assert "reporting it to the master" in worker_logs, worker_logs[-3000:]


# -- the protocol in one process: two data planes, connections aborted under load --


class _Receiver:
    """Takes every frame and processes each batch at once (returns its credit)."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.events: list[tuple[Any, ...]] = []

    def on_batch(self, app: str, channel: str, records: list[Any], ret: Any) -> bool:
        self.records += records
        ret.grant(app, channel, 1)
        return True

    def on_end(self, app: str, channel: str) -> bool:
        self.events.append(("end", channel))
        return True

    def on_state(self, app: str, dst: str, src: str, state: Any, pending: Any = None) -> bool:
        self.events.append(("state", dst, src, state))
        return True

    def on_epoch(self, app: str, channel: str, version: int) -> bool:
        self.events.append(("epoch", channel, version))
        return True

    def on_barrier(self, app: str, channel: str, checkpoint: int) -> bool:
        self.events.append(("barrier", channel, checkpoint))
        return True


def _abort_all(*planes: Any) -> int:
    n = 0
    for dp in planes:
        for link in dp.links.values():
            for conn in list(link.conns):
                conn.writer.transport.abort()
                n += 1
    return n


def test_streams_resend_and_dedupe_across_aborted_connections() -> None:
    from hotwire.worker.channels import RemoteChannel
    from hotwire.worker.transport import DataPlane

    async def scenario() -> tuple[_Receiver, _Receiver, Any, Any, int]:
        ra, rb = _Receiver(), _Receiver()
        a, b = DataPlane("a", ra), DataPlane("b", rb)
        for dp in (a, b):
            await dp.start("127.0.0.1", 0)
        a.peers["b"], b.peers["a"] = b.address, a.address
        ab = RemoteChannel("app", "x@1.0>y@1.0", a, "b")
        ba = RemoteChannel("app", "y@1.0>z@1.0", b, "a")
        await ab.connect()
        aborted = 0
        for i in range(3000):
            await ab.send([i, i])
            await ba.send([i])
            if i == 1500:
                a.send_state("b", "app", "y@2.0", "y@1.0", {"k": i}, [])
                await ab.epoch(2)
            if i % 250 == 125:
                await ab.barrier(i)
                aborted += _abort_all(a, b)
            if i % 8 == 0:
                await asyncio.sleep(0)
        await ab.end()
        await ba.end()

        async def ended() -> None:
            while ("end", "x@1.0>y@1.0") not in rb.events or (
                "end",
                "y@1.0>z@1.0",
            ) not in ra.events:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(ended(), 20)
        await a.close()
        await b.close()
        return ra, rb, a, b, aborted

    ra, rb, a, b, aborted = asyncio.run(scenario())
    assert aborted >= 10
    assert rb.records == [i for i in range(3000) for _ in (0, 1)], "a->b: once each, in order"
    assert ra.records == list(range(3000)), "b->a: once each, in order"
    assert rb.events.count(("state", "y@2.0", "y@1.0", {"k": 1500})) == 1
    barriers = [e[2] for e in rb.events if e[0] == "barrier"]
    assert barriers == sorted(set(barriers)) and len(barriers) == 12
    assert rb.events.count(("epoch", "x@1.0>y@1.0", 2)) == 1
    assert a.stats["reconnects"] + b.stats["reconnects"] >= 10
    assert not a.drops and not b.drops, (a.drops, b.drops)


def test_a_link_down_past_the_timeout_is_reported_and_an_early_one_is_not() -> None:
    from hotwire.worker.channels import RemoteChannel
    from hotwire.worker.transport import DataPlane

    async def scenario() -> tuple[list[Any], list[Any], float]:
        a = DataPlane("a", _Receiver(), link_timeout=0.5)
        await a.start("127.0.0.1", 0)
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            a.peers["b"] = f"127.0.0.1:{s.getsockname()[1]}"
        ch = RemoteChannel("app", "x@1.0>y@1.0", a, "b")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await ch.send([1])  # kept for the resend; the send does not fail
        early = a.lost_links()
        while not (late := a.lost_links()) and loop.time() - t0 < 5:
            await asyncio.sleep(0.02)
        await a.close()
        return early, late, loop.time() - t0

    early, late, after = asyncio.run(scenario())
    assert early == []
    assert [(x.peer, x.apps) for x in late] == [("b", ["app"])], late
    assert after >= 0.5 and late[0].down_s >= 0.5 and "dialling" in late[0].error, late
