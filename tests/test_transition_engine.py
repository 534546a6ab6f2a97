"""The master's transition engine.

The steps of one transition (hotwire.master.transition) are a pure state machine:
these tests feed it events and check the actions it answers with, exactly for each
path and over random interleavings of worker replies, failures, timeouts, late and
duplicated answers and store failures (hypothesis). The engine that carries the
actions out (hotwire.master.engine) is driven with an in-process instruction
stream whose workers answer, refuse, fail or never answer, and a real store; the
tests with a real master and workers are test_upgrade, test_locks, test_liveness,
test_integrity and test_fencing.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotwire.master.engine import Refused, TransitionEngine
from hotwire.master.membership import WorkerGone
from hotwire.master.store import Store
from hotwire.master.transition import (
    AbortDone,
    Action,
    ClearIntent,
    Event,
    Fallback,
    Phase,
    Prepared,
    PrepareRefused,
    RecoveryDone,
    Reply,
    RestartFromCheckpoint,
    Result,
    SendAbort,
    SendPrepare,
    SendSwitch,
    StartTimer,
    StopEverywhere,
    StoreCommit,
    Stored,
    StoreFailed,
    StoreIntent,
    Switched,
    SwitchRefused,
    TimedOut,
    Transition,
)
from hotwire.model import LogicalModel, PESpec, StreamSpec
from hotwire.proto import hotwire_pb2 as pb

W = ("w1", "w2", "w3")


def started(fallback: Fallback = Fallback.RESTART) -> Transition:
    t = Transition("app", reversed(W), fallback)
    assert t.start() == [StoreIntent("prepare")]
    assert t.handle(Stored("prepare")) == [StartTimer(Phase.PREPARE), *(SendPrepare(w) for w in W)]
    return t


def switching(fallback: Fallback = Fallback.RESTART) -> Transition:
    t = started(fallback)
    for w in W:
        t.handle(Prepared(w))
    assert t.phase is Phase.STORE_SWITCH
    assert t.handle(Stored("switch")) == [StartTimer(Phase.SWITCH), *(SendSwitch(w) for w in W)]
    return t


# ---------------------------------------------------------------------------
# The state machine, path by path
# ---------------------------------------------------------------------------
def test_every_worker_prepares_then_switches_then_the_commit_is_stored() -> None:
    t = started()
    assert t.handle(Prepared("w2")) == []
    assert t.handle(Prepared("w1")) == []
    assert t.handle(Prepared("w3")) == [StoreIntent("switch")], "the switch is recorded first"
    assert t.handle(Stored("switch")) == [StartTimer(Phase.SWITCH), *(SendSwitch(w) for w in W)]
    assert t.handle(Switched("w3")) == []
    assert t.handle(Switched("w1")) == []
    assert t.handle(Switched("w2")) == [StoreCommit()]
    assert t.handle(Stored("switch")) == [], "a late answer to an earlier write"
    assert t.handle(Stored("commit")) == [Reply(Result.COMMITTED)]
    assert t.done


def test_a_refused_prepare_aborts_everywhere_once_every_worker_answered() -> None:
    t = started()
    assert t.handle(PrepareRefused("w2", "setup raised")) == [], "w1 and w3 may still prepare"
    assert t.handle(Prepared("w1")) == []
    assert t.handle(Prepared("w3")) == [StartTimer(Phase.ABORT), *(SendAbort(w) for w in W)]
    assert t.handle(AbortDone("w1")) == []
    assert t.handle(AbortDone("w3")) == []
    assert t.handle(AbortDone("w2")) == [ClearIntent()]
    [reply] = t.handle(Stored("clear"))
    assert reply == Reply(
        Result.ABORTED,
        "the change failed in prepare and was undone; the running version is unchanged: "
        "setup raised",
    )


def test_a_prepare_timeout_counts_the_silent_workers_as_refused() -> None:
    t = started()
    t.handle(Prepared("w1"))
    assert t.handle(TimedOut(Phase.SWITCH)) == [], "a timer of another phase is stale"
    actions = t.handle(TimedOut(Phase.PREPARE))
    assert actions == [StartTimer(Phase.ABORT), *(SendAbort(w) for w in W)]
    assert "worker 'w2' did not answer the prepare in time" in t.error
    assert t.handle(Prepared("w2")) == [], "a late prepare changes nothing"
    assert t.handle(TimedOut(Phase.ABORT)) == [ClearIntent()]
    assert t.handle(StoreFailed("clear", "disk full")) == [Reply(Result.ABORTED, t.error)]


def test_a_failed_switch_clears_the_intent_then_restarts_from_the_checkpoint() -> None:
    t = switching()
    t.handle(Switched("w1"))
    t.handle(SwitchRefused("w3", "handover timed out"))
    assert t.handle(Switched("w2")) == [ClearIntent()]
    assert t.handle(Stored("clear")) == [RestartFromCheckpoint()]
    assert t.handle(RecoveryDone()) == [
        Reply(Result.RESTARTED, "switch failed: handover timed out")
    ]


def test_a_failed_switch_of_a_new_app_stops_it_and_of_a_restart_is_reported() -> None:
    t = switching(Fallback.STOP)
    t.handle(TimedOut(Phase.SWITCH))
    assert t.handle(Stored("clear")) == [StopEverywhere()]
    assert t.handle(RecoveryDone()) == [
        Reply(Result.STOPPED, "switch failed: worker 'w1' did not answer the switch in time")
    ]
    t = switching(Fallback.NONE)
    for w in W:
        t.handle(SwitchRefused(w, f"{w} is gone"))
    assert t.handle(Stored("clear")) == [Reply(Result.FAILED, "switch failed: w1 is gone")]


def test_a_restart_that_fails_too_is_reported_with_both_reasons() -> None:
    t = switching()
    t.handle(TimedOut(Phase.SWITCH))
    t.handle(Stored("clear"))
    [reply] = t.handle(RecoveryDone("no free slots"))
    assert reply.result is Result.FAILED and reply.recovery_error == "no free slots"
    assert reply.error.startswith("switch failed: ")


def test_store_failures_never_leave_workers_half_switched() -> None:
    t = Transition("app", W)
    t.start()
    [reply] = t.handle(StoreFailed("prepare", "disk full"))
    assert reply.result is Result.FAILED and "nothing changed: disk full" in reply.error
    t = started()
    for w in W:
        t.handle(Prepared(w))
    # The switch could not be recorded: a master crash now would abort it, so abort.
    assert t.handle(StoreFailed("switch", "disk full")) == [
        StartTimer(Phase.ABORT),
        *(SendAbort(w) for w in W),
    ]
    t = switching()
    for w in W:
        t.handle(Switched(w))
    [reply] = t.handle(StoreFailed("commit", "disk full"))
    assert reply.result is Result.FAILED and "every worker switched" in reply.error


def test_answers_out_of_place_are_ignored() -> None:
    t = started()
    assert t.handle(Switched("w1")) == [], "a switch ack during prepare"
    assert t.handle(Prepared("w9")) == [], "a worker outside the plan"
    assert t.handle(RecoveryDone()) == []
    t.handle(PrepareRefused("w1", "no"))
    assert t.handle(Prepared("w1")) == [], "a second answer from the same worker"
    t.handle(Prepared("w2"))
    t.handle(Prepared("w3"))
    assert t.phase is Phase.ABORT, "w1's first answer (a refusal) counts"


def test_an_interrupted_transition_is_undone_in_prepare_and_finished_in_switch() -> None:
    t = Transition("app", W, resume="prepare")
    assert t.start() == [StartTimer(Phase.ABORT), *(SendAbort(w) for w in W)]
    t = Transition("app", W, resume="switch")
    assert t.start() == [StartTimer(Phase.SWITCH), *(SendSwitch(w) for w in W)]
    for w in W:
        t.handle(Switched(w))
    assert t.handle(Stored("commit")) == [Reply(Result.COMMITTED)]
    with pytest.raises(RuntimeError, match="already started"):
        t.start()
    with pytest.raises(ValueError, match=re.escape("cannot resume a transition in phase 'x'")):
        Transition("app", W, resume="x")


# ---------------------------------------------------------------------------
# The state machine over random interleavings
# ---------------------------------------------------------------------------
@dataclass
class World:
    """What the workers and the store did, as the machine's actions made them."""

    workers: tuple[str, ...]
    state: dict[str, str] = field(default_factory=dict)  # old | prepared | switched | half
    intent: str = ""
    committed: bool = False
    recovered: bool = False
    aborted: set[str] = field(default_factory=set)
    sent: list[Action] = field(default_factory=list)


def answer(a: Action, w: World, ok: bool) -> Event:
    """What a worker or the store answers to ``a``, and its effect on ``w``."""
    if isinstance(a, SendPrepare):
        # A prepare answered late still ran before an abort that followed it.
        w.state[a.worker] = "prepared" if ok and a.worker not in w.aborted else "old"
        return Prepared(a.worker) if ok else PrepareRefused(a.worker, "refused")
    if isinstance(a, SendSwitch):
        w.state[a.worker] = "switched" if ok else "half"
        return Switched(a.worker) if ok else SwitchRefused(a.worker, "failed")
    if isinstance(a, SendAbort):
        return AbortDone(a.worker)  # done when sent (see carry_out), answered or not
    if isinstance(a, RestartFromCheckpoint | StopEverywhere):
        if ok:
            w.recovered = True
            w.state = dict.fromkeys(w.workers, "old")
        return RecoveryDone("" if ok else "no room")
    assert isinstance(a, StoreIntent | ClearIntent | StoreCommit)
    if not ok:
        return StoreFailed(a.write, "disk full")
    if isinstance(a, StoreIntent):
        w.intent = a.phase
    elif isinstance(a, ClearIntent):
        w.intent = ""
    elif isinstance(a, StoreCommit):
        w.committed, w.intent = True, ""
    return Stored(a.write)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workers=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True),
    fallback=st.sampled_from(Fallback),
    resume=st.sampled_from(["", "", "", "prepare", "switch"]),
    data=st.data(),
)
def test_every_transition_commits_everywhere_or_leaves_nothing_half_applied(
    workers: list[str], fallback: Fallback, resume: str, data: st.DataObject
) -> None:
    t = Transition("app", workers, fallback, resume)
    w = World(tuple(sorted(workers)))
    if resume == "prepare":
        w.intent, w.state = "prepare", dict.fromkeys(w.workers, "prepared")
    elif resume == "switch":
        w.intent, w.state = "switch", dict.fromkeys(w.workers, "prepared")
    outstanding: list[Action] = []
    timers: list[Phase] = []
    delivered: list[Event] = []
    replies: list[Reply] = []

    def carry_out(actions: list[Action]) -> None:
        assert not replies, f"{actions} after the reply"
        for a in actions:
            w.sent.append(a)
            if isinstance(a, Reply):
                replies.append(a)
            elif isinstance(a, SendAbort):
                # It follows the prepare on the worker's ordered instruction stream,
                # so it undoes the prepare even when its own answer is lost.
                w.aborted.add(a.worker)
                if w.state.get(a.worker) == "prepared":
                    w.state[a.worker] = "old"
                outstanding.append(a)
            elif isinstance(a, StartTimer):
                timers.append(a.phase)
            else:
                outstanding.append(a)

    carry_out(t.start())
    replays = 10
    for _ in range(200):
        if t.done:
            break
        n = len(outstanding) + len(timers)
        assert n, f"stuck in {t.phase}: the machine waits for nothing"
        if delivered and replays and data.draw(st.integers(0, 7)) == 0:
            replays -= 1
            carry_out(t.handle(data.draw(st.sampled_from(delivered))))  # late and again
            continue
        i = data.draw(st.integers(0, n - 1))
        if i < len(outstanding):
            a = outstanding.pop(i)
            ev = answer(a, w, data.draw(st.booleans()) or data.draw(st.booleans()))
        else:
            ev = TimedOut(timers.pop(i - len(outstanding)))
        delivered.append(ev)
        carry_out(t.handle(ev))
    assert t.done and len(replies) == 1 and w.sent[-1] is replies[0]
    for ev in delivered:
        assert t.handle(ev) == [], "nothing happens after the reply"

    result = replies[0].result
    switches = [a for a in w.sent if isinstance(a, SendSwitch)]
    if result is Result.COMMITTED:
        assert w.committed and not w.intent
        assert set(w.state.values()) == {"switched"}, w.state
        assert {a.worker for a in switches} == set(w.workers)
        assert not any(isinstance(a, SendAbort | RestartFromCheckpoint) for a in w.sent)
        return
    assert not w.committed
    r = replies[0]
    if result is Result.ABORTED:
        assert not switches, "aborted only before any switch"
        assert "half" not in w.state.values() and "prepared" not in w.state.values(), w.state
        assert {a.worker for a in w.sent if isinstance(a, SendAbort)} == set(w.workers)
        # An intent left behind (its removal failed) says "prepare": a restarted
        # master would only abort again.
        assert w.intent in ("", "prepare")
    elif result in (Result.RESTARTED, Result.STOPPED):
        assert w.recovered and set(w.state.values()) == {"old"}, w.state
        assert fallback is (Fallback.RESTART if result is Result.RESTARTED else Fallback.STOP)
    elif r.error.startswith("every worker switched"):
        assert set(w.state.values()) == {"switched"}, "only the store's record is missing"
    elif r.error.startswith("switch failed"):
        # Half switched and not recovered here: the caller is told, and recovers.
        assert fallback is Fallback.NONE or r.recovery_error
    else:
        assert "nothing changed" in r.error
        assert not any(isinstance(a, SendPrepare | SendSwitch) for a in w.sent)


# ---------------------------------------------------------------------------
# The engine, over an in-process instruction stream and a real store
# ---------------------------------------------------------------------------
@dataclass
class FakeWorker:
    slots: int = 8
    connected: asyncio.Event = field(default_factory=asyncio.Event)


class Stream:
    """The membership as the engine sees it: workers that answer each batch as
    ``behave(worker, phase, n)`` says ("ok", "refuse", "gone" or "silent"), where
    ``n`` counts the batches of that phase the worker got before: in these tests
    0 is the submit's, 1 the upgrade's and 2 a restart's."""

    def __init__(self, names: list[str], behave: Callable[[str, int, int], str]):
        self.workers = {n: FakeWorker() for n in names}
        self.behave = behave
        self.batches: list[tuple[str, int, str, int]] = []  # (worker, phase, app, epoch)

    def alive(self, name: str) -> bool:
        return name in self.workers

    def connected(self, name: str) -> bool:
        return name in self.workers

    def live(self) -> dict[str, FakeWorker]:
        return dict(self.workers)

    async def send(
        self, worker: str, phase: int, app: str, version: int, ins: Any, *a: Any, **kw: Any
    ) -> pb.Ack:
        n = sum(1 for w, p, _, _ in self.batches if (w, p) == (worker, phase))
        self.batches.append((worker, phase, app, version))
        how = self.behave(worker, phase, n)
        if how == "silent":
            await asyncio.sleep(3600)
        if how == "gone":
            raise WorkerGone(f"worker {worker!r} disconnected")
        return pb.Ack(ok=how == "ok", error="" if how == "ok" else f"{worker} refused")


def app_model(par: int = 2) -> LogicalModel:
    pes = [PESpec("src", "source", par, "f1", "src"), PESpec("out", "sink", 1, "f2", "out")]
    return LogicalModel.build("app", pes, [StreamSpec("src", "out")])


def quick(engine: TransitionEngine) -> TransitionEngine:
    engine.prepare_timeout = engine.switch_timeout = engine.abort_timeout = 0.05
    engine.switch_grace = 0.0
    engine.timer_margin = 0.01
    return engine


async def submit(engine: TransitionEngine, model: LogicalModel, version: int = 1) -> Any:
    cur = engine.apps.get("app")
    old = cur.model if cur is not None else LogicalModel.build("app", [], [])
    async with engine.claim("app", "a test"):
        return await engine.change(
            "app",
            version,
            "submit" if cur is None else "upgrade",
            old,
            cur.placement if cur is not None else {},
            model,
            b"bundle",
            "hash",
        )


def run_engine(behave: Callable[[str, int, int], str], body: Any) -> Any:
    async def main() -> Any:
        with tempfile.TemporaryDirectory() as d:
            store = await asyncio.to_thread(Store, Path(d) / "hotwire.db")
            try:
                stream = Stream(["w1", "w2"], behave)
                engine = quick(TransitionEngine(stream))  # type: ignore[arg-type]
                await engine.load(store)
                return await body(engine, stream)
            finally:
                await asyncio.to_thread(store.close)

    return asyncio.run(main())


def test_the_engine_commits_a_submit_and_refuses_a_second_while_it_holds_the_lock() -> None:
    async def body(engine: TransitionEngine, stream: Stream) -> None:
        o = await submit(engine, app_model())
        assert o.applied and engine.apps["app"].version == 1
        assert {(w, p) for w, p, _, _ in stream.batches} == {
            (w, p) for w in ("w1", "w2") for p in (pb.PREPARE, pb.SWITCH)
        }
        async with engine.hold("app", "a recovery"):
            with pytest.raises(Refused, match=re.escape("app 'app': a recovery is in progress")):
                await submit(engine, app_model(3), 2)
        assert not engine.busy("app")
        interrupted = await engine.interrupted()
        assert interrupted == [], "a committed transition leaves no intent"

    run_engine(lambda w, p, e: "ok", body)


def test_the_engine_restarts_the_running_version_when_a_switch_fails() -> None:
    def behave(worker: str, phase: int, n: int) -> str:
        return "refuse" if (worker, phase, n) == ("w2", pb.SWITCH, 1) else "ok"

    async def body(engine: TransitionEngine, stream: Stream) -> None:
        restarts: list[dict[str, Any]] = []
        engine.on_restart = restarts.append
        await submit(engine, app_model())
        with pytest.raises(Refused) as e:
            await submit(engine, app_model(3), 2)
        assert e.value.code == grpc.StatusCode.ABORTED
        assert str(e.value) == (
            "app 'app': switch failed: w2 refused; version 1 was restarted from its last checkpoint"
        )
        st = engine.apps["app"]
        assert (st.version, st.epoch) == (1, 2), "the restart is the next transition"
        assert {pl.parallelism for pl in st.placement.values()} == {1, 2}
        assert [r["why"] for r in restarts] == ["a switch did not finish"]
        assert not engine.busy("app")

    run_engine(behave, body)


def test_a_transition_needs_the_apps_lock() -> None:
    async def body(engine: TransitionEngine, stream: Stream) -> None:
        with pytest.raises(RuntimeError, match="needs the app's lock"):
            await engine.change("app", 1, "submit", app_model(), {}, app_model(), b"", "h")

    run_engine(lambda w, p, e: "ok", body)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replies=st.dictionaries(
        st.tuples(st.sampled_from(["w1", "w2"]), st.sampled_from([pb.PREPARE, pb.SWITCH])),
        st.sampled_from(["refuse", "gone", "silent"]),
        max_size=3,
    ),
    restart_fails=st.booleans(),
)
def test_the_engine_always_releases_the_lock_and_commits_all_or_nothing(
    replies: dict[tuple[str, int], str], restart_fails: bool
) -> None:
    def behave(worker: str, phase: int, n: int) -> str:
        if n == 1:  # the upgrade under test
            return replies.get((worker, phase), "ok")
        if n == 2 and restart_fails and phase == pb.SWITCH:
            return "refuse"
        return "ok"

    async def body(engine: TransitionEngine, stream: Stream) -> None:
        await submit(engine, app_model())
        mark = len(stream.batches)
        try:
            await submit(engine, app_model(3), 2)
            error = ""
        except Refused as e:
            error = str(e)
        assert not engine.busy("app"), "the lock is released"
        st = engine.apps["app"]
        sent = {(w, p) for w, p, _, _ in stream.batches[mark:]}
        switched = {w for w, p in sent if p == pb.SWITCH}
        if not error:
            assert not replies and (st.version, st.epoch) == (2, 2)
            assert switched == {"w1", "w2"}
            assert {pl.parallelism for pl in st.placement.values()} == {1, 3}
        elif any(p == pb.PREPARE for _, p in replies):
            assert "undone" in error and not switched, "undone in prepare: nothing switched"
            assert {w for w, p in sent if p == pb.ABORT} == {"w1", "w2"}
            assert (st.version, st.epoch) == (1, 1)
        else:
            assert switched == {"w1", "w2"} and {w for w, p in sent if p == pb.STOP}
            assert st.version == 1, "the running version stays"
            if restart_fails:
                assert "failed too" in error and st.epoch == 1
            else:
                assert "was restarted from its last checkpoint" in error and st.epoch == 2
                assert {pl.parallelism for pl in st.placement.values()} == {1, 2}
        if not (error and restart_fails):
            assert await engine.interrupted() == [], "no intent left behind"

    run_engine(behave, body)
