"""Fencing: a worker the master declared dead cannot keep running next to its replacements.

A worker frozen (SIGSTOP) for longer than the heartbeat timeout is declared dead and
its apps restart from their last checkpoint on the live workers. When it runs again
it learns that its session was fenced, stops every instance the master no longer
places on it before it registers again, and holds its sources and sinks from the
moment it notices it was frozen until the master has answered. A master that is
merely down stops nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from hotwire.testing import read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, wait_until, write_app

SINK_APP = """
import json, os, threading, time
from hotwire import Topology
from hotwire.sdk import ProcessPE
from hotwire.testing import counter

OUT = {out_dir!r}
_lock = threading.Lock()
_files = []


def write(r):
    # One file per worker process; every line says when it was written.
    with _lock:
        if not _files:
            path = os.path.join(OUT, f"sink.{{os.getpid()}}.jsonl")
            _files.append(open(path, "a", buffering=1, encoding="utf-8"))
        _files[0].write(json.dumps({{"seq": r["seq"], "n": r["n"], "t": time.time()}}) + "\\n")


class Count(ProcessPE):
    def setup(self, ctx):
        self.n = {{}}

    def process(self, r):
        k = r["key"]
        self.n[k] = self.n.get(k, 0) + 1
        yield {{"seq": r["seq"], "key": k, "n": self.n[k]}}

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n.update(state)


app = Topology({name!r})
src = app.source("src", counter(n={n}, rate={rate}, keys=32))
counted = src.key_by(lambda r: r["key"]).process("count", Count, parallelism=2)
counted.sink("out", write, parallelism=2)
"""


def _app(tmp_path: Path, name: str, n: int, rate: float) -> tuple[str, Path]:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    body = SINK_APP.format(out_dir=str(out_dir), name=name, n=n, rate=rate)
    return write_app(tmp_path, f"{name}.py", body), out_dir


def _rows(out_dir: Path, pid: int) -> list[dict[str, Any]]:
    return read_jsonl(out_dir / f"sink.{pid}.jsonl")


def _all_seqs(out_dir: Path) -> Counter[int]:
    return Counter(r["seq"] for p in out_dir.glob("sink.*.jsonl") for r in read_jsonl(p))


def _placed(c: LocalCluster, app: str) -> dict[str, set[str]]:
    """worker -> the instance ids the master places on it, from ``streamctl status --json``."""
    res = c.streamctl("status", app, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    out: dict[str, set[str]] = {}
    for p in doc["pes"]:
        for i in p["instances"]:
            out.setdefault(i["worker"], set()).add(f"{app}/{p['name']}@{p['gen']}.{i['index']}")
    return out


def _reported(c: LocalCluster, worker: str) -> set[str] | None:
    """What ``worker`` itself reports running, or None while it is not alive."""
    for w in c.client.workers().workers:
        if w.name == worker:
            return set(w.instances) if w.alive else None
    return None


def test_a_worker_frozen_past_the_heartbeat_timeout_is_fenced_and_stops_its_old_instances(
    tmp_path: Path,
) -> None:
    timeout, n, rate = 1.0, 16_000, 2000.0
    app, out_dir = _app(tmp_path, "fenced", n, rate)
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=timeout) as c:
        c.client.submit(app)
        poll_for(
            lambda: c.client.status("fenced").apps[0].last_checkpoint >= 1, 15, what="a checkpoint"
        )
        placed = _placed(c, "fenced")
        victim = next(w for w, iids in placed.items() if any("/src@" in i for i in iids))
        survivor = "w2" if victim == "w1" else "w1"
        assert any("/out@" in i for i in placed[victim]), placed  # a source and a sink
        vpid = c.worker(victim).proc.pid
        poll_for(lambda: len(_rows(out_dir, vpid)) > 100, 10, what="the victim's sink writing")
        problems: list[str] = []

        # Under load, freeze the worker that runs the source and a sink.
        c.pause_worker(victim)
        t_stop = time.monotonic()
        time.sleep(1.5 * timeout)  # the freeze itself
        # The master declares it dead and restarts the app on the survivor while the
        # victim is still frozen: it does not wait for a dead worker to answer.
        try:
            poll_for(
                lambda: (
                    c.client.status("fenced").apps[0].recoveries >= 1
                    and set(_placed(c, "fenced")) == {survivor}
                ),
                15,
                what="the app to be recovered on the survivor",
            )
        except TimeoutError as e:
            problems.append(f"no recovery while {victim} was frozen: {e}")
        recovered_after = time.monotonic() - t_stop
        if recovered_after > timeout + 5:
            problems.append(
                f"the recovery waited for the frozen worker: it took {recovered_after:.1f} s"
            )
        written_before = len(_rows(out_dir, vpid))
        t_cont = time.time()
        c.resume_worker(victim)

        # The stale worker learns it was fenced, stops its old instances and rejoins
        # running only what the master places on it (nothing: the app moved).
        def settled() -> bool:
            mine = _reported(c, victim)
            return mine is not None and mine <= _placed(c, "fenced").get(victim, set())

        try:
            poll_for(settled, 15, what=f"{victim} to rejoin running only what is placed on it")
        except TimeoutError as e:
            problems.append(f"{e}: it reports {_reported(c, victim)}")
        poll_for(
            lambda: set(_all_seqs(out_dir)) >= set(range(n)), 60, what="every record at the sink"
        )
        # Nothing was written by the victim's old instances after it ran again, except
        # at most the one batch its sink was in the middle of when it froze.
        late = [r for r in _rows(out_dir, vpid)[written_before:] if r["t"] >= t_cont]
        if len(late) > 256:
            problems.append(
                f"{len(late)} records written by {victim}'s old sink after it ran again, "
                f"the last {late[-1]['t'] - t_cont:.2f} s after"
            )
        st = c.client.status("fenced").apps[0]
        hosts = {i.worker for p in st.pes for i in p.instances}
        if hosts != {survivor}:
            problems.append(f"instances placed on {hosts}, expected only {survivor}")
        mine = _reported(c, victim)
        if mine:
            problems.append(f"{victim} still runs {sorted(mine)}")
        log = c.worker(victim).log_path.read_text(errors="replace")
        assert not problems, "\n".join(problems) + "\n" + c.logs()
        assert "fenced" in log, log[-3000:]
        # At least once: every record reached a sink; a replayed record saw the
        # checkpointed state (the same per-key count as its first copy).
        seqs = _all_seqs(out_dir)
        assert set(seqs) == set(range(n))
        n_of: dict[int, set[int]] = {}
        for p in out_dir.glob("sink.*.jsonl"):
            for r in read_jsonl(p):
                n_of.setdefault(r["seq"], set()).add(r["n"])
        assert all(len(v) == 1 for v in n_of.values()), "a replayed record saw other state"


def test_a_worker_cut_off_the_master_stops_its_old_instances_when_it_is_back(
    tmp_path: Path,
) -> None:
    """A partition between one worker and the master (its data plane still up)."""
    timeout, n, rate = 1.0, 16_000, 2000.0
    app, out_dir = _app(tmp_path, "parted", n, rate)
    with LocalCluster(
        workers=2, data_dir=tmp_path / "c", heartbeat_timeout=timeout, control_proxy=True
    ) as c:
        c.client.submit(app)
        poll_for(
            lambda: c.client.status("parted").apps[0].last_checkpoint >= 1, 15, what="a checkpoint"
        )
        placed = _placed(c, "parted")
        victim = next(w for w, iids in placed.items() if any("/src@" in i for i in iids))
        survivor = "w2" if victim == "w1" else "w1"
        vpid = c.worker(victim).proc.pid
        poll_for(lambda: len(_rows(out_dir, vpid)) > 100, 10, what="the victim's sink writing")
        c.partition_worker(victim)
        poll_for(
            lambda: (
                c.client.status("parted").apps[0].recoveries >= 1
                and set(_placed(c, "parted")) == {survivor}
            ),
            timeout + 8,
            what="the app to be recovered on the survivor",
        )
        t_heal = time.time()
        c.heal_worker(victim)

        def settled() -> bool:
            mine = _reported(c, victim)
            return mine is not None and mine <= _placed(c, "parted").get(victim, set())

        try:
            poll_for(settled, 20, what=f"{victim} to rejoin running only what is placed on it")
        except TimeoutError as e:
            raise AssertionError(
                f"{e}: it reports {sorted(_reported(c, victim) or [])}, the master places "
                f"{_placed(c, 'parted')}\n{c.logs()}"
            ) from e
        t_settled = time.time()
        poll_for(
            lambda: set(_all_seqs(out_dir)) >= set(range(n)), 60, what="every record at the sink"
        )
        # While cut off it cannot tell a partition from a master that is down, so its
        # instances ran on; once it heard that it was fenced they stopped.
        late = [r for r in _rows(out_dir, vpid) if r["t"] > t_settled]
        assert not late, (
            f"{len(late)} records written by {victim}'s old sink after it rejoined "
            f"({t_settled - t_heal:.2f} s after the partition healed)"
        )
        assert _reported(c, victim) == set()
        assert "fenced" in c.worker(victim).log_path.read_text(errors="replace")
        assert set(_all_seqs(out_dir)) == set(range(n))


def test_a_master_down_longer_than_the_heartbeat_timeout_stops_nothing(tmp_path: Path) -> None:
    timeout, n, rate = 1.0, 12_000, 2000.0
    app, out_dir = _app(tmp_path, "steady", n, rate)
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=timeout) as c:
        c.client.submit(app)
        poll_for(lambda: sum(_all_seqs(out_dir).values()) > 500, 10, what="records flowing")
        placed = _placed(c, "steady")
        c.stop_master()
        t_down = time.time()
        # Records keep flowing well past the heartbeat timeout with no master at all.
        poll_for(
            lambda: any(
                r["t"] > t_down + 3 * timeout
                for p in out_dir.glob("sink.*.jsonl")
                for r in read_jsonl(p)
            ),
            15,
            what="records written 3 heartbeat timeouts after the master stopped",
        )
        t_up = time.time()
        c.restart_master()
        poll_for(lambda: c.live_workers() == 2, 15, what="workers to register again")
        # The restarted master reads the placements back; the workers keep them all.
        poll_for(
            lambda: all(_reported(c, w) == placed.get(w, set()) for w in ("w1", "w2")),
            10,
            what="workers to report what is placed on them",
        )
        poll_for(lambda: set(_all_seqs(out_dir)) >= set(range(n)), 30, what="every record")
        rows = sorted(
            (r["t"] for p in out_dir.glob("sink.*.jsonl") for r in read_jsonl(p)),
        )
        gaps = [b - a for a, b in itertools.pairwise(rows) if t_down <= a <= t_up]
        assert max(gaps) < timeout, f"the sinks stopped for {max(gaps):.2f} s without a master"
        seqs = _all_seqs(out_dir)
        assert set(seqs) == set(range(n)) and max(seqs.values()) == 1
        assert c.client.status("steady").apps[0].recoveries == 0


def test_a_short_freeze_holds_output_until_the_master_answers_and_loses_nothing(
    tmp_path: Path,
) -> None:
    timeout, n, rate = 3.0, 12_000, 2000.0
    app, out_dir = _app(tmp_path, "blink", n, rate)
    with LocalCluster(workers=2, data_dir=tmp_path / "c", heartbeat_timeout=timeout) as c:
        c.client.submit(app)
        placed = _placed(c, "blink")
        victim = next(w for w, iids in placed.items() if any("/src@" in i for i in iids))
        vpid = c.worker(victim).proc.pid
        poll_for(lambda: len(_rows(out_dir, vpid)) > 100, 10, what="the victim's sink writing")
        # Longer than half the timeout (the worker notices it was frozen), shorter
        # than the timeout less a heartbeat interval (the master does not fence it).
        c.pause_worker(victim)
        time.sleep(0.6 * timeout)  # the freeze itself
        c.resume_worker(victim)
        log = c.worker(victim).log_path
        poll_for(
            lambda: "resume" in log.read_text(errors="replace"),
            10,
            what=f"{victim} to hold its output and resume it",
        )
        poll_for(lambda: set(_all_seqs(out_dir)) >= set(range(n)), 30, what="every record")
        seqs = _all_seqs(out_dir)
        assert max(seqs.values()) == 1, "records duplicated: nothing failed, nothing replays"
        st = c.client.status("blink").apps[0]
        assert st.recoveries == 0
        assert _placed(c, "blink") == placed
        assert "fenced" not in log.read_text(errors="replace")


# ---------------------------------------------------------------------------
# The master's side, in process
# ---------------------------------------------------------------------------


async def test_a_fenced_session_is_refused_everything(tmp_path: Path) -> None:
    from hotwire.master.recovery import PendingCheckpoint
    from hotwire.master.service import Master
    from hotwire.proto import hotwire_pb2 as pb
    from hotwire.proto import hotwire_pb2_grpc as pb_grpc

    master = Master(
        listen="127.0.0.1:0", data_dir=tmp_path / "m", heartbeat_timeout=1.0, checkpoint_interval=0
    )
    await master.start()
    try:
        async with grpc.aio.insecure_channel(master.address) as channel:
            stub = pb_grpc.WorkerControlStub(channel)
            first = await stub.Register(
                pb.RegisterRequest(name="w9", data_address="127.0.0.1:1", slots=1), timeout=5
            )
            outgoing: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()
            outgoing.put_nowait(pb.WorkerMessage(hello=pb.Hello(name="w9", session=first.session)))

            async def messages() -> Any:
                while (m := await outgoing.get()) is not None:
                    yield m

            control = stub.Control(messages())
            ms = master.membership
            await wait_until(lambda: ms.workers["w9"].connected.is_set(), 5, "the control stream")
            old = ms.workers["w9"]
            # Another worker keeps beating: the master hears the cluster, so a silent
            # worker is dead (it declares none dead while it hears from none).
            other = await stub.Register(
                pb.RegisterRequest(name="w8", data_address="127.0.0.1:3", slots=1), timeout=5
            )

            async def beat() -> None:
                while True:
                    req = pb.HeartbeatRequest(name="w8", session=other.session)
                    await stub.Heartbeat(req, timeout=5)
                    await asyncio.sleep(0.1)

            beating = asyncio.create_task(beat())
            # No heartbeat: the master declares w9 dead and fences its session.
            await wait_until(lambda: "w9" in master.recovery.handled, 15, "w9 to be declared dead")

            with pytest.raises(grpc.aio.AioRpcError) as hb:
                await stub.Heartbeat(
                    pb.HeartbeatRequest(name="w9", session=first.session), timeout=5
                )
            assert hb.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'w9'" in hb.value.details() and "fenced" in hb.value.details()
            assert "register again" in hb.value.details()
            assert "no heartbeat" in old.fenced and not ms.alive("w9")

            # Its control stream was ended with the same answer...
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for _ in control:
                    pass
            assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # ...and cannot be opened again under that session.
            again = stub.Control(
                iter([pb.WorkerMessage(hello=pb.Hello(name="w9", session=first.session))])
            )
            with pytest.raises(grpc.aio.AioRpcError) as hello:
                async for _ in again:
                    pass
            assert hello.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as drain:
                await stub.Drain(pb.DrainRequest(name="w9", session=first.session), timeout=5)
            assert drain.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            # A checkpoint report of the old session does not count towards a checkpoint.
            p = PendingCheckpoint(7, 0, {"src@1.0"}, time.monotonic())
            master.recovery.pending["a"] = p
            report = pb.CheckpointReport(app="a", checkpoint=7, instance="src@1.0", state=b"\x80")
            assert not ms.accept(old, pb.WorkerMessage(report=report))
            assert not p.states and not p.done.is_set()

            # Registering again opens a new session with a higher epoch; the old one stays
            # refused.
            second = await stub.Register(
                pb.RegisterRequest(name="w9", data_address="127.0.0.1:2", slots=1), timeout=5
            )
            assert second.session != first.session and second.epoch > first.epoch
            assert "no heartbeat" in second.fenced
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Heartbeat(
                    pb.HeartbeatRequest(name="w9", session=first.session), timeout=5
                )
            assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            await stub.Heartbeat(pb.HeartbeatRequest(name="w9", session=second.session), timeout=5)
            assert ms.accept(ms.workers["w9"], pb.WorkerMessage(report=report))
            assert p.done.is_set()
            assert ms.peers() == {"w8": "127.0.0.1:3", "w9": "127.0.0.1:2"}
            beating.cancel()
    finally:
        await master.close()


async def test_registration_names_the_instances_the_master_no_longer_places_there(
    tmp_path: Path,
) -> None:
    from hotwire.master.service import AppState, Master
    from hotwire.model import LogicalModel
    from hotwire.plan import PEPlacement
    from hotwire.proto import hotwire_pb2 as pb
    from hotwire.proto import hotwire_pb2_grpc as pb_grpc

    master = Master(
        listen="127.0.0.1:0", data_dir=tmp_path / "m", heartbeat_timeout=30, checkpoint_interval=0
    )
    await master.start()
    empty = LogicalModel.build("a", [], [])
    master.apps["a"] = AppState(
        "a", 1, "running", empty, "b", {"src": PEPlacement(2, "b", ("w9", "w8"))}, 2
    )
    master.apps["k"] = AppState(
        "k", 1, "killed", empty, "b", {"p": PEPlacement(1, "b", ("w9",))}, 1
    )
    running = [
        ("a", "src@1.0"),  # an older generation: replaced
        ("a", "src@2.0"),  # placed here
        ("a", "src@2.1"),  # placed on w8
        ("a", "src@3.0"),  # a transition in flight created it: it commits or aborts it
        ("k", "p@1.0"),  # the app was killed
        ("x", "p@1.0"),  # an app this master does not know: left alone
    ]
    try:
        async with grpc.aio.insecure_channel(master.address) as channel:
            stub = pb_grpc.WorkerControlStub(channel)
            reply = await stub.Register(
                pb.RegisterRequest(
                    name="w9",
                    data_address="127.0.0.1:1",
                    slots=4,
                    running=[pb.RunningInstance(app=a, instance=i) for a, i in running],
                ),
                timeout=5,
            )
            stale = {(r.app, r.instance) for r in reply.stale}
            assert stale == {("a", "src@1.0"), ("a", "src@2.1"), ("k", "p@1.0")}
            # Heartbeats go on reconciling: what the worker still reports as stale is named.
            hb = await stub.Heartbeat(
                pb.HeartbeatRequest(
                    name="w9",
                    session=reply.session,
                    running=[pb.RunningInstance(app=a, instance=i) for a, i in running],
                ),
                timeout=5,
            )
            assert {(r.app, r.instance) for r in hb.stale} == stale
    finally:
        await master.close()
