"""The instance state machine (hotwire.worker.machine), without asyncio or sockets.

Example tests for each event kind, and a property test that drives the machine
through random interleavings of batches, barriers, epochs, gates, switches,
aborts, ends, handovers and failures on several input channels, carrying out its
actions as the worker does, and checks after every step that no record is lost
or duplicated and order per channel holds, that every snapshot is a consistent
cut (but for checkpoints that span a transition: the master ignores those), and
that nothing stays held without a reason.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from hotwire import plan
from hotwire.worker import machine as sm
from hotwire.worker.machine import InstanceMachine

POISON = "poison"


def in_share(r: Any) -> bool:
    """A key in an adopted canary's share: every third record of a channel."""
    return isinstance(r[-1], int) and r[-1] % 3 == 0


def switch(version: int, after_epoch: tuple[str, ...] = ()) -> plan.Switch:
    return plan.Switch("app", version, "pe@1.0", (), (), (), after_epoch, ())


def retire(version: int = 9) -> plan.Retire:
    return plan.Retire("app", version, "pe@1.0", (plan.Successor("pe@2.0", "w1"),), False)


def kinds(acts: list[sm.Action]) -> list[str]:
    return [type(a).__name__ for a in acts]


class Credit:
    """A batch's credit handle: counts how often it was returned."""

    def __init__(self) -> None:
        self.granted = 0


# -- examples, one event kind at a time ---------------------------------------
def test_a_batch_on_an_open_channel_is_processed_and_reported() -> None:
    m = InstanceMachine(("a",))
    assert m.handle(sm.START) == [sm.Released()]
    ret = Credit()
    assert m.handle(sm.Batch("a", [1, 2], ret)) == [sm.Process("a", [1, 2], ret)]
    assert m.busy == ("a", ret)
    assert m.handle(sm.PROCESSED) == []
    assert m.busy is None


def test_a_batch_while_one_is_processed_is_refused() -> None:
    m = InstanceMachine(("a",))
    m.handle(sm.Batch("a", [1]))
    with pytest.raises(RuntimeError, match=re.escape("a batch while ('a', None) is carried out")):
        m.handle(sm.Batch("a", [2]))
    with pytest.raises(RuntimeError, match="End while"):
        m.handle(sm.End("a"))


def test_an_unknown_event_and_an_unknown_policy_are_refused() -> None:
    with pytest.raises(TypeError, match="str is not an event"):
        InstanceMachine(("a",)).handle("batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("config on_error='retry' is not one of")):
        InstanceMachine(on_error="retry")


def test_a_gate_holds_the_appearing_channel_until_the_replaced_one_ends() -> None:
    m = InstanceMachine(("a", "b"))
    assert m.handle(sm.Gate(2, ("c",), ("b",))) == []
    assert m.inputs == {"a", "b", "c"}
    assert m.handle(sm.Batch("c", [1])) == []  # held
    assert m.handle(sm.Batch("c", [2])) == []
    assert kinds(m.handle(sm.Batch("b", [0]))) == ["Process"]
    m.handle(sm.PROCESSED)
    acts = m.handle(sm.End("b"))
    assert acts == [sm.ForgetInput("b"), sm.GateOpened(2), sm.Process("c", [1], None)]
    assert m.handle(sm.PROCESSED) == [sm.Process("c", [2], None)]
    assert m.handle(sm.PROCESSED) == []
    assert m.inputs == {"a", "c"} and not m.held


def test_a_gate_with_nothing_to_wait_for_opens_at_once() -> None:
    m = InstanceMachine(("a",))
    assert m.handle(sm.Gate(2, ("c",), ("b",))) == [sm.GateOpened(2)]
    assert kinds(m.handle(sm.Batch("c", [1]))) == ["Process"]


def test_an_abort_drops_the_gate_and_releases_what_it_held_once() -> None:
    m = InstanceMachine(("a", "b"))
    m.handle(sm.Gate(2, ("c",), ("b",)))
    m.handle(sm.Batch("c", [1]))
    assert m.handle(sm.Abort(2)) == []  # from outside the task: the driver resumes it
    assert m.inputs == {"a", "b"} and m.flow == ["c"]
    assert m.handle(sm.RESUME) == [sm.Process("c", [1], None)]
    assert m.handle(sm.PROCESSED) == []
    assert m.handle(sm.RESUME) == []
    assert m.handle(sm.Abort(2)) == []  # twice: nothing


def test_epoch_markers_hold_channels_until_the_switch_applies() -> None:
    m = InstanceMachine(("a", "b"))
    sw = switch(2, ("a", "b"))
    assert m.handle(sm.Switch(sw)) == []  # waits for both markers
    assert m.handle(sm.Epoch("a", 2)) == []
    assert m.handle(sm.Batch("a", [1])) == []  # behind the marker: after the cut
    assert kinds(m.handle(sm.Batch("b", [9]))) == ["Process"]  # before the cut
    m.handle(sm.PROCESSED)
    assert m.handle(sm.Epoch("b", 2)) == [sm.ApplySwitch(sw), sm.Process("a", [1], None)]
    assert m.handle(sm.PROCESSED) == []
    assert not m.epoch_held and not m.held


def test_a_switch_after_its_markers_applies_at_once() -> None:
    m = InstanceMachine(("a",))
    sw = switch(3, ("a",))
    m.handle(sm.Epoch("a", 3))
    assert m.handle(sm.Switch(sw)) == [sm.ApplySwitch(sw)]
    assert m.handle(sm.Switch(switch(4))) == [sm.ApplySwitch(switch(4))]


def test_an_abort_abandons_an_alignment_waiting_for_the_aborted_channel() -> None:
    """Found by the interleaving property below: an alignment begun while a gate's
    channel was open waited for its barrier after the abort removed it, so the
    channels it blocked queued the next checkpoints' barriers behind their records
    and a later snapshot missed a record sent before its barrier."""
    m = InstanceMachine(("a", "c"))
    m.handle(sm.START)
    m.handle(sm.Gate(2, ("n",), ("a",)))
    assert m.handle(sm.Barrier("a", 1)) == []  # aligning: owes c and n
    assert m.need == {"c", "n"}
    m.handle(sm.Abort(2))
    assert m.aligning == 0 and m.abandoned == 1 and m.barrier_held == set()
    assert kinds(m.handle(sm.Batch("a", [1]))) == ["Process"]  # a flows again
    m.handle(sm.PROCESSED)
    assert m.handle(sm.Barrier("c", 1)) == []  # of the abandoned checkpoint: ignored
    assert m.handle(sm.Barrier("a", 2)) == []
    assert m.handle(sm.Barrier("c", 2)) == [sm.ForwardBarrier(2), sm.Snapshot(2)]


def test_barriers_align_then_snapshot_forward_and_release() -> None:
    m = InstanceMachine(("a", "b"))
    assert m.handle(sm.Barrier("a", 1)) == []
    assert m.barrier_held == {"a"}
    assert m.handle(sm.Batch("a", [1])) == []  # after the barrier: held
    assert kinds(m.handle(sm.Batch("b", [2]))) == ["Process"]  # before it: processed
    m.handle(sm.PROCESSED)
    # the barrier goes on first; the state is packed before anything is processed
    assert m.handle(sm.Barrier("b", 1)) == [sm.ForwardBarrier(1), sm.Snapshot(1)]
    assert m.last_checkpoint == 1
    assert m.handle(sm.SNAPSHOTTED) == [sm.Process("a", [1], None)]
    assert m.handle(sm.PROCESSED) == []
    assert m.handle(sm.Barrier("a", 1)) == []  # a late barrier of a completed checkpoint


def test_a_newer_barrier_abandons_the_older_alignment() -> None:
    m = InstanceMachine(("a", "b"))
    m.handle(sm.Barrier("a", 1))
    m.handle(sm.Batch("a", [1]))
    # b lost barrier 1; its barrier 2 abandons checkpoint 1, which lets a flow
    assert m.handle(sm.Barrier("b", 2)) == [sm.Process("a", [1], None)]
    assert m.aligning == 2 and m.abandoned == 1 and m.barrier_held == {"b"}
    assert m.handle(sm.PROCESSED) == []
    assert m.handle(sm.Barrier("a", 1)) == []  # abandoned
    assert m.handle(sm.Barrier("a", 2)) == [sm.ForwardBarrier(2), sm.Snapshot(2)]


def test_an_older_barrier_is_ignored_while_a_newer_aligns() -> None:
    m = InstanceMachine(("a", "b"))
    m.handle(sm.Barrier("a", 2))
    assert m.handle(sm.Barrier("b", 1)) == []
    assert m.barrier_held == {"a"} and m.aligning == 2


def test_an_end_marker_abandons_the_alignment_before_a_gate_opens() -> None:
    m = InstanceMachine(("a", "b"))
    m.handle(sm.Gate(2, ("c",), ("b",)))
    m.handle(sm.Barrier("a", 1))
    m.handle(sm.Batch("a", [1]))
    m.handle(sm.Batch("c", [2]))
    acts = m.handle(sm.End("b"))
    # what the barrier held goes before the channel that replaces b
    assert acts == [sm.ForgetInput("b"), sm.GateOpened(2), sm.Process("a", [1], None)]
    assert m.handle(sm.PROCESSED) == [sm.Process("c", [2], None)]
    assert m.abandoned == 1


def test_a_source_snapshots_on_a_checkpoint_and_commits_on_done() -> None:
    m = InstanceMachine(source=True)
    assert m.handle(sm.Checkpoint(4)) == [sm.Snapshot(4)]
    assert m.handle(sm.SNAPSHOTTED) == [sm.ForwardBarrier(4)]
    assert m.handle(sm.CheckpointDone(4)) == [sm.Commit(4)]
    assert InstanceMachine(("a",)).handle(sm.Checkpoint(4)) == []  # not a source


def test_a_handover_restores_and_its_pending_input_goes_first() -> None:
    m = InstanceMachine(("a",), ("p", "q"))
    assert m.handle(sm.START) == []
    assert m.handle(sm.Batch("a", [3])) == []  # held: predecessors' state not in
    assert m.handle(sm.Barrier("a", 1)) == []
    assert m.handle(sm.Handover("p", {"k": 1}, [1])) == []
    assert m.handle(sm.Handover("x", None)) == [sm.DropState("x")]
    acts = m.handle(sm.Handover("q", None, [2]))
    assert acts == [
        sm.Restore(({"k": 1}, None)),
        sm.Released(),
        sm.Process("handover:p", [1], None),
    ]
    assert m.handle(sm.PROCESSED) == [sm.Process("handover:q", [2], None)]
    assert m.handle(sm.PROCESSED) == [sm.Process("a", [3], None)]
    assert m.handle(sm.PROCESSED) == [sm.ForwardBarrier(1), sm.Snapshot(1)]  # after its batch


def test_a_retired_instance_finishes_when_its_inputs_ended() -> None:
    m = InstanceMachine(("a", "b"))
    r = retire()
    assert m.handle(sm.Retire(r)) == []
    m.handle(sm.Epoch("b", 5))
    m.handle(sm.Batch("b", [7]))  # held behind an epoch marker whose switch never comes
    assert m.handle(sm.End("a")) == [sm.ForgetInput("a")]
    assert m.handle(sm.End("b")) == [sm.ForgetInput("b"), sm.Finish(r, [7])]
    assert m.finished and not m.held
    assert InstanceMachine(source=True).handle(sm.Retire(r)) == [sm.Finish(r, [])]


def test_record_errors_follow_the_policy() -> None:
    skip = InstanceMachine(("a",))
    assert skip.handle(sm.RecordError(1, "E: x")) == [sm.Skip(1, "E: x", "skipped", True)]
    dl = InstanceMachine(("a",), on_error="dead_letter")
    assert dl.handle(sm.RecordError(1, "E: x")) == [
        sm.DeadLetter(1, "E: x"),
        sm.Skip(1, "E: x", "dead-lettered", True),
    ]
    for _ in range(sm.MAX_LOGGED_ERRORS):
        skip.handle(sm.RecordError(1, "E: x"))
    assert skip.handle(sm.RecordError(1, "E: x")) == [sm.Skip(1, "E: x", "skipped", False)]
    assert skip.errors == sm.MAX_LOGGED_ERRORS + 2 and not skip.failed


def test_on_error_fail_holds_the_rest_and_everything_after() -> None:
    m = InstanceMachine(("a", "b"), on_error="fail")
    ret = Credit()
    m.handle(sm.Batch("a", [1, 2, 3], ret))
    assert m.handle(sm.RecordError(2, "E: x")) == [sm.Stop(2, "E: x")]
    assert m.handle(sm.Processed([2, 3])) == []
    assert m.failed == "E: x"
    r4, r5, r6 = Credit(), Credit(), Credit()
    assert m.handle(sm.Batch("a", [4], r4)) == []
    assert m.handle(sm.Batch("b", [5], r5)) == []
    assert m.handle(sm.Barrier("b", 1)) == []  # no checkpoint cuts past held input
    # Retired, it returns the credit of what it holds (its senders must reach the
    # switch that ends their channels), and of each batch until the end markers.
    assert m.handle(sm.Retire(retire())) == [
        sm.ReturnCredit((("a", ret), ("a", r4), ("b", r5)))  # ret: the batch it stopped in
    ]
    assert m.handle(sm.Batch("b", [6], r6)) == [sm.ReturnCredit((("b", r6),))]
    assert m.handle(sm.Batch("b", [7])) == []  # a handover's input: no credit owed
    m.handle(sm.End("a"))
    assert m.handle(sm.End("b"))[-1] == sm.Finish(retire(), [2, 3, 4, 5, 6, 7])


def test_state_that_cannot_be_stored_fails_the_instance_with_its_channels_held() -> None:
    m = InstanceMachine(("a",))
    assert m.handle(sm.Barrier("a", 1)) == [sm.ForwardBarrier(1), sm.Snapshot(1)]
    assert m.handle(sm.Fail("StateError: no")) == []
    assert m.failed == "StateError: no" and m.errors == 1 and m.busy is None
    assert m.handle(sm.Batch("a", [1])) == []
    src = InstanceMachine(source=True, on_error="dead_letter")
    assert src.handle(sm.Fail("E: it", position=7)) == [sm.DeadLetter(None, "E: it", 7)]


# -- random interleavings -------------------------------------------------------
@dataclass
class World:
    """Senders on several channels and a driver that carries out the machine's
    actions like the worker's Instance, recording what happened."""

    policy: str
    preds: tuple[str, ...]
    m: InstanceMachine = field(init=False)
    open: list[str] = field(default_factory=lambda: ["a", "b", "c"])
    sent: dict[str, list[Any]] = field(default_factory=dict)
    processed: list[Any] = field(default_factory=list)
    skipped: list[Any] = field(default_factory=list)
    consumed: list[Any] = field(default_factory=list)  # processed or skipped, in order
    dead: list[Any] = field(default_factory=list)
    finished: list[sm.Finish] = field(default_factory=list)
    next_barrier: dict[str, int] = field(default_factory=dict)
    # (channel, checkpoint) -> records sent on the channel before its barrier
    barrier_at: dict[tuple[str, int], int] = field(default_factory=dict)
    open_at_barrier: dict[int, set[str]] = field(default_factory=dict)
    snapshots: list[int] = field(default_factory=list)
    fail_snapshot: bool = False
    # Checkpoints up to this one span a transition: the master ignores their reports
    # (a transition abandons the checkpoint in flight), so their cut is not checked.
    spanning: int = 0
    version: int = 1
    epoch: dict[str, Any] | None = None  # the epoch transition in progress
    gate: dict[str, Any] | None = None  # the gate transition in progress
    adopt: dict[str, Any] | None = None  # the adoption (a canary's abort) in progress
    adoptions: int = 0
    merges: list[int] = field(default_factory=list)
    switches: list[int] = field(default_factory=list)
    gates_opened: list[int] = field(default_factory=list)
    n_channels: int = 3
    epoch_transitions: int = 0
    epochs: dict[int, set[str]] = field(default_factory=dict)  # version -> channels delivered
    credits: list[Credit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.m = InstanceMachine(tuple(self.open), self.preds, on_error=self.policy)
        self.handover_sent: set[str] = set()
        self.run(sm.START)

    # the driver
    def run(self, ev: sm.Event) -> None:
        acts = self.m.handle(ev)
        while acts:
            report = None
            for a in acts:
                report = self.perform(a) or report
            acts = self.m.handle(report) if report is not None else []
        assert self.m.busy is None

    def perform(self, a: sm.Action) -> sm.Event | None:
        if isinstance(a, sm.Process):
            for i, r in enumerate(a.records):
                if r[1] == POISON:
                    acts = self.m.handle(sm.RecordError(r, "ValueError: poison"))
                    if any(isinstance(x, sm.Stop) for x in acts):
                        return sm.Processed(a.records[i:])
                    self.dead += [x.record for x in acts if isinstance(x, sm.DeadLetter)]
                    self.skipped.append(r)
                else:
                    self.processed.append(r)
                self.consumed.append(r)
            if a.ret is not None:
                a.ret.granted += 1
            return sm.PROCESSED
        if isinstance(a, sm.Snapshot):
            if self.fail_snapshot:
                return sm.Fail("StateError: cannot serialise")
            if a.checkpoint > self.spanning:
                self.check_cut(a.checkpoint)
            self.snapshots.append(a.checkpoint)
            return sm.SNAPSHOTTED
        if isinstance(a, sm.ApplySwitch):
            self.switches.append(a.switch.version)
        elif isinstance(a, sm.GateOpened):
            self.gates_opened.append(a.version)
        elif isinstance(a, sm.Finish):
            self.finished.append(a)
        elif isinstance(a, sm.Merge):
            self.merges.append(a.version)
        elif isinstance(a, sm.ReturnCredit):
            assert self.m.failed and self.m.retire is not None, "credit for unprocessed input"
            for _ch, ret in a.batches:
                ret.granted += 1
        return None

    # what the senders do
    def send(self, ch: str, n: int, poison: bool) -> None:
        seq = self.sent.setdefault(ch, [])
        records: list[Any] = [(ch, len(seq) + i) for i in range(n)]
        if poison:  # the user function raises on this one
            records[-1] = (ch, POISON, len(seq) + n - 1)
        seq += records
        ret = Credit()
        self.credits.append(ret)
        self.run(sm.Batch(ch, records, ret))

    def barrier(self, ch: str, lose: bool) -> None:
        cid = self.next_barrier.get(ch, 0) + 1
        self.next_barrier[ch] = cid
        if self.epoch is not None or self.gate is not None:
            self.spanning = max(self.spanning, cid)
        # (an adoption spans no checkpoint: its cut must hold, the master may use it)
        if lose:
            return
        self.barrier_at[(ch, cid)] = len(self.sent.get(ch, []))
        self.open_at_barrier.setdefault(cid, set(self.open))
        self.run(sm.Barrier(ch, cid))

    def end(self, ch: str) -> None:
        self.open.remove(ch)
        self.run(sm.End(ch))

    def handover(self, pred: str, n: int) -> None:
        self.handover_sent.add(pred)
        records = [(f"h:{pred}", i) for i in range(n)]
        self.sent[f"h:{pred}"] = records
        self.run(sm.Handover(pred, {"from": pred}, records))

    # the properties
    def check_cut(self, cid: int) -> None:
        """The snapshot holds exactly the records before barrier ``cid`` on every
        channel that delivered it, all handed-over input, and every channel open
        when the checkpoint's first barrier came delivered it."""
        done = Counter(r[0] for r in self.consumed)
        for ch, seq in self.sent.items():
            if ch.startswith("h:"):
                assert done[ch] == len(seq), f"checkpoint {cid} misses input handed over by {ch}"
            elif (ch, cid) in self.barrier_at:
                assert done[ch] == self.barrier_at[(ch, cid)], (
                    f"checkpoint {cid}: {done[ch]} records of {ch} in the snapshot, "
                    f"{self.barrier_at[(ch, cid)]} before its barrier"
                )
        owing = {
            ch
            for ch in self.open_at_barrier.get(cid, set()) & set(self.open)
            if (ch, cid) not in self.barrier_at
        }
        assert not owing, f"checkpoint {cid} completed without the barrier of {owing}"

    def check(self) -> None:
        """No record lost or duplicated, order per channel, nothing held for nothing."""
        m = self.m
        held = [
            (key, r)
            for key, q in m.held.items()
            for records, _ in q
            if records is not None
            for r in records
        ] + [(f"handover:{pred}", r) for pred, records in m.pred_pending for r in records]
        # what an adoption holds came before anything its channel holds otherwise
        held[:0] = [(ch, r) for ch, parts in m.adopt_held.items() for part in parts for r in part]
        held += [(f"handover:{p}", r) for p, records in m.adopt_pending for r in records]
        unprocessed = [r for f in self.finished for r in f.unprocessed]
        everything = self.processed + self.skipped + [r for _, r in held] + unprocessed
        sent = [r for seq in self.sent.values() for r in seq]
        assert Counter(everything) == Counter(sent), "records lost or duplicated"
        assert len(self.finished) <= 1
        # Order per channel; after an adoption, per key: the canary's share may
        # be held while the other keys of its channel go on.
        classes: list[Any] = [lambda r: True]
        if self.adoptions:
            classes = [in_share, lambda r: not in_share(r)]
        for ch, seq in self.sent.items():
            for cls in classes:
                mine = [r for r in self.consumed if r[0] == ch and cls(r)]
                later = [r for r in [r for _, r in held] + unprocessed if r[0] == ch and cls(r)]
                assert mine + later == [r for r in seq if cls(r)], f"order on {ch}"
        if self.policy != "fail":
            assert self.dead == (self.skipped if self.policy == "dead_letter" else [])
        # Held input has a reason to be held; nothing released is left behind.
        assert not m.flow
        if self.adopt is None and not m.pending_preds:  # (a new one merges after restoring)
            assert m.in_share is None and not m.adopt_held and not m.adopt_blocked
        else:
            assert all(in_share(r) for parts in m.adopt_held.values() for p in parts for r in p)
        for key in m.held:
            ch = key
            assert m.pending_preds or m.failed or m.blocked(ch), f"{ch} held for nothing"
        gated = {c for appearing, _ in m.gates.values() for c in appearing}
        assert m.holding == gated
        assert not m.barrier_held or m.aligning or m.failed, "barrier-held with no alignment"
        waiting = {c for v, chs in self.epochs.items() if v not in self.switches for c in chs}
        assert m.epoch_held <= waiting, "held behind an epoch marker whose switch applied"
        assert self.snapshots == sorted(set(self.snapshots)), "a checkpoint snapshotted twice"
        # A batch returns its credit once, and only when processed.
        assert all(c.granted <= 1 for c in self.credits)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    policy = draw(st.sampled_from(sm.ON_ERROR))
    preds = draw(st.sampled_from([(), ("p",), ("p", "q")]))
    return World(policy, preds)


def step(w: World, data: st.DataObject, faults: bool = True) -> str:
    """Draw one thing that may happen now, make it happen, and say what it was."""
    options = ["batch", "barrier", "checkpoint_done"]
    if len(w.open) > 1:
        options.append("end")
    pending = [p for p in w.preds if p not in w.handover_sent]
    if pending:
        options.append("handover")
    if w.epoch is None and w.gate is None and w.adopt is None:
        options += ["epoch_transition", "gate_transition"]
        if not pending or not (w.adoptions or w.handover_sent):
            # a kept instance's (an abort), or a new one's from its prepare (a promote)
            options.append("adopt_transition")
    if w.adopt is not None:
        options += ["adopt_handover", "adopt_abort"]
    if w.epoch is not None:
        options += ["epoch", "switch"]
    if w.gate is not None and w.gate["state"] == "prepared":
        options.append("abort")
    if faults and not w.fail_snapshot:
        options.append("fail_snapshots")
    options.append("stray_handover")
    what = data.draw(st.sampled_from(options))
    if what == "batch":
        ch = data.draw(st.sampled_from(w.open))
        n = data.draw(st.integers(1, 3))
        w.send(ch, n, poison=faults and data.draw(st.integers(0, 9)) == 0)
        return f"batch {ch}"
    if what == "barrier":
        ch = data.draw(st.sampled_from(w.open))
        lose = faults and data.draw(st.integers(0, 7)) == 0
        w.barrier(ch, lose)
        return f"barrier {ch}"
    if what == "checkpoint_done":
        w.run(sm.CheckpointDone(max(w.snapshots, default=0)))
        return what
    if what == "end":
        # What the master guarantees: a channel ends with a transition, after the
        # new instances of the one before got their state; it does not end after
        # an epoch marker whose switch did not apply (the sender's switch sends
        # the end marker instead); a channel a gate adds ends after the one it
        # replaces.
        if pending or w.adopt is not None:  # an adopting instance's inputs stay
            return "no end"
        owing = set(w.epoch["owed"]) if w.epoch is not None else set()
        owing |= {c for v, chs in w.epochs.items() if v not in w.switches for c in chs}
        candidates = [c for c in w.open if c not in owing]
        if w.gate is not None:
            candidates = [c for c in candidates if c != w.gate["appearing"]]
        if not candidates or len(w.open) < 2:
            return "no end"
        ch = data.draw(st.sampled_from(candidates))
        w.end(ch)
        if w.gate is not None and ch == w.gate["replaced"]:
            w.gate = None  # done: the gate opened
        return f"end {ch}"
    if what == "handover":
        pred = data.draw(st.sampled_from(pending))
        w.handover(pred, data.draw(st.integers(0, 2)))
        return f"handover {pred}"
    if what == "stray_handover":
        w.run(sm.Handover("stray", None, []))  # dropped: not a predecessor
        return what
    if what in ("epoch_transition", "gate_transition"):
        w.spanning = max(w.next_barrier.values(), default=0)
    if what == "epoch_transition":
        w.epoch_transitions += 1
        w.version += 1
        after = data.draw(st.sets(st.sampled_from(w.open)))
        w.epoch = {"version": w.version, "after": tuple(sorted(after)), "owed": set(after),
                   "switch_sent": False}  # fmt: skip
        return what
    if what == "epoch":
        assert w.epoch is not None
        if not w.epoch["owed"]:
            return "no epoch"
        ch = data.draw(st.sampled_from(sorted(w.epoch["owed"])))
        w.epoch["owed"].discard(ch)
        w.epochs.setdefault(w.epoch["version"], set()).add(ch)
        w.run(sm.Epoch(ch, w.epoch["version"]))
        if not w.epoch["owed"] and w.epoch["switch_sent"]:
            w.epoch = None
        return f"epoch {ch}"
    if what == "switch":
        assert w.epoch is not None
        if w.epoch["switch_sent"]:
            return "no switch"
        w.epoch["switch_sent"] = True
        w.run(sm.Switch(switch(w.epoch["version"], w.epoch["after"])))
        if not w.epoch["owed"]:
            w.epoch = None
        return what
    if what == "gate_transition":
        w.version += 1
        replaced = data.draw(st.sampled_from(w.open))
        appearing = f"n{w.n_channels}"
        w.n_channels += 1
        w.run(sm.Gate(w.version, (appearing,), (replaced,)))
        w.open.append(appearing)
        w.gate = {"version": w.version, "appearing": appearing, "replaced": replaced,
                  "state": "prepared"}  # fmt: skip
        if data.draw(st.booleans()):
            w.gate["state"] = "switched"  # the switch went through: the old channel may end
        return what
    if what == "abort":
        assert w.gate is not None
        w.open.remove(w.gate["appearing"])
        w.m.handle(sm.Abort(w.gate["version"]))  # from outside the task
        if w.m.flow:
            w.run(sm.RESUME)  # as the instance does
        w.gate = None
        return what
    if what == "adopt_transition":
        w.version += 1
        w.adoptions += 1
        pred = f"cp{w.version}"
        w.m.handle(sm.Adopt(w.version, (pred,), in_share))  # prepare: from outside the task
        w.adopt = {"version": w.version, "pred": pred}
        return what
    if what == "adopt_handover":
        assert w.adopt is not None
        w.handover(w.adopt["pred"], data.draw(st.integers(0, 2)))
        w.adopt = None
        return what
    if what == "adopt_abort":
        assert w.adopt is not None
        w.m.handle(sm.Abort(w.adopt["version"]))  # from outside the task
        if w.m.flow:
            w.run(sm.RESUME)
        w.adopt = None
        return what
    if what == "fail_snapshots":
        w.fail_snapshot = True
        return what
    raise AssertionError(what)


def finale(w: World) -> None:
    """Every predecessor hands over, every switch arrives, the instance retires
    and every input ends: it finishes, and unless it failed it processed all."""
    for pred in w.preds:
        if pred not in w.handover_sent:
            w.handover(pred, 1)
    if w.adopt is not None:
        w.handover(w.adopt["pred"], 1)
        w.adopt = None
    if w.epoch is not None:
        for ch in sorted(w.epoch["owed"]):
            w.epochs.setdefault(w.epoch["version"], set()).add(ch)
            w.run(sm.Epoch(ch, w.epoch["version"]))
        if not w.epoch["switch_sent"]:
            w.run(sm.Switch(switch(w.epoch["version"], w.epoch["after"])))
        w.epoch = None
    w.run(sm.Retire(retire()))
    for ch in list(w.open):
        w.end(ch)
    w.check()
    assert len(w.finished) == 1, "a retired instance whose inputs all ended did not finish"
    if not w.m.failed:
        assert w.finished[0].unprocessed == [], "held input never released"
        assert w.m.errors == len(w.skipped)
    # A retired instance owes no credit: what it processed and, had it failed, what
    # it hands on unprocessed (its senders could not reach the end otherwise).
    assert all(c.granted == 1 for c in w.credits), "a batch kept its credit"


@settings(deadline=None, max_examples=400)
@given(w=worlds(), data=st.data())
def test_random_interleavings_keep_every_record_once_in_order(
    w: World, data: st.DataObject
) -> None:
    for _ in range(data.draw(st.integers(0, 60))):
        note(step(w, data))
        w.check()
    finale(w)


@settings(deadline=None, max_examples=200)
@given(w=worlds(), data=st.data())
def test_random_interleavings_without_faults_release_all_held_input(
    w: World, data: st.DataObject
) -> None:
    """No poison record, lost barrier or failed snapshot: the instance never
    fails, every switch applies once, every gate opens once unless aborted, and
    the finale processes everything (checked in ``finale``)."""
    for _ in range(data.draw(st.integers(0, 60))):
        note(step(w, data, faults=False))
        w.check()
        assert not w.m.failed
    finale(w)
    assert w.switches == sorted(set(w.switches)) and len(w.switches) == w.epoch_transitions
    assert not w.m.gates and len(w.gates_opened) == len(set(w.gates_opened))
    assert w.merges == sorted(set(w.merges)) and len(w.merges) <= w.adoptions
