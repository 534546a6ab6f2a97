"""The transition logic of one PE instance, as a pure state machine.

:class:`InstanceMachine` decides what an instance does with each thing that
reaches it: an input batch, an end marker, an epoch marker, a checkpoint barrier,
a predecessor's state, a gate, a switch, a retirement, an abort or a failure. It
takes one event (:meth:`InstanceMachine.handle`) and returns the actions to carry
out, in order. It holds no asyncio object, socket, clock or user code: the driver
(:class:`hotwire.worker.instance.Instance`) runs the user function, sends markers,
snapshots state and hands it over, and reports back.

Two actions block: after :class:`Process` the driver reports :class:`Processed`
(with the records the PE left unprocessed when it stopped on an error), after
:class:`Snapshot` it reports :class:`Snapshotted` or :class:`Fail`. A blocking
action is always the last of the list it comes in, and the machine decides
nothing past it until the report arrives: a record that stops the PE, or state
that cannot be serialised, changes what comes next. Meanwhile only :class:`Gate`,
:class:`Abort`, :class:`RecordError`, :class:`Fail` and :class:`Resume` may come
(from outside the instance's task or from inside the user function).

The rules:

* **Hold.** A batch is held (and returns no credit) while the instance waits for a
  predecessor's state, while it has stopped on an error, and while its channel
  is held by a gate, by an epoch marker or by a barrier; and behind batches its
  channel already holds, so order per channel holds.
* **Gate.** An appearing channel is held until every channel it replaces has
  delivered its end marker; then it flows and :class:`GateOpened` is returned.
  An abort drops the gate and lets what the channel held flow.
* **Epoch.** A channel that delivered the epoch marker of a version is held until
  the instance switches to that version; the switch waits for the marker on
  every channel in ``Switch.after_epoch``.
* **Barrier.** The first barrier of a checkpoint aligns on the input channels
  open at that moment: each channel that delivered it is held; when all have,
  the instance forwards the barrier, snapshots its state (:class:`Snapshot`) and
  lets the held channels flow (a source snapshots its position first, then
  forwards: its barrier follows that position). One checkpoint aligns at a time:
  a barrier of a newer checkpoint abandons the older one (it can no longer
  complete), a barrier of an older one is ignored, and so is every barrier of an
  abandoned or completed checkpoint or reaching a failed instance. An end marker abandons the
  alignment in flight (the master abandons checkpoints when a transition begins).
* **Release.** Held channels that stop being held flow again in the order they
  were released, each channel's batches and barriers in arrival order.
* **Handover.** A new instance with predecessors restores their states once all
  arrived; input they held unprocessed comes before anything else.
* **Adopt.** A keyed instance that takes over a retiring canary's keys (a kept
  one at an abort, a new one at a promote, after it restored its other
  predecessors' state) holds
  each input record whose key is in the canary's share (not its batch: the other
  records are processed at once and the credit returned), and every barrier
  with the batches behind it on its channel, until every predecessor's state is
  in; then it merges the states (:class:`Merge`), processes the input the
  predecessors held unprocessed, then what it held, in order per channel. An
  abort of the transition lets what it held flow.
* **Retire.** Once retired, with every input ended and all predecessors' state
  in, the instance finishes (:class:`Finish`), handing on what it holds
  unprocessed. A failed instance that is retired returns the credit of what it
  holds, and of what arrives until its inputs end (:class:`ReturnCredit`): a
  sender waiting for that credit could not reach its end marker otherwise.
* **Errors.** A record that raises is skipped, dead-lettered or stops the
  instance, per the PE's ``on_error`` policy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hotwire import plan

ON_ERROR = ("skip", "fail", "dead_letter")  # a PE's config["on_error"] policies
MAX_LOGGED_ERRORS = 20


# -- events ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Start:
    """The instance's task starts."""


@dataclass(slots=True)  # not frozen: one per batch, and a frozen one costs 2.5 times as much
class Batch:
    """An input batch on ``channel``; ``ret`` returns its credit once processed."""

    channel: str
    records: list[Any]
    ret: Any = None


@dataclass(frozen=True, slots=True)
class End:
    """``channel`` delivered its end marker: nothing more comes on it."""

    channel: str


@dataclass(frozen=True, slots=True)
class Epoch:
    """``channel`` delivered the epoch marker of ``version``."""

    channel: str
    version: int


@dataclass(frozen=True, slots=True)
class Barrier:
    """``channel`` delivered the barrier of checkpoint ``checkpoint``."""

    channel: str
    checkpoint: int


@dataclass(frozen=True, slots=True)
class Handover:
    """Predecessor ``src`` handed over its state and the input it held unprocessed."""

    src: str
    state: Any
    pending: list[Any] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Gate:
    """Prepare: ``appearing`` input channels are added; they are held until every
    channel of ``disappearing`` that is an input delivered its end marker."""

    version: int
    appearing: tuple[str, ...]
    disappearing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Adopt:
    """Prepare: take over the keys of ``predecessors`` (retiring) while running;
    ``in_share(record)`` says whether a record's key is theirs until then."""

    version: int
    predecessors: tuple[str, ...]
    in_share: Any  # Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class Abort:
    """The transition to ``version`` is aborted: its gate and channels go."""

    version: int


@dataclass(frozen=True, slots=True)
class Switch:
    """Switch to ``switch.version`` once its epoch marker arrived on every channel
    of ``switch.after_epoch``."""

    switch: plan.Switch


@dataclass(frozen=True, slots=True)
class Retire:
    """Finish once every input ended, and hand state to ``retire.successors``."""

    retire: plan.Retire


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Control item: a source snapshots its position and sends barrier ``id`` downstream."""

    id: int


@dataclass(frozen=True, slots=True)
class CheckpointDone:
    """Control item: checkpoint ``id`` is stored; transactional sinks commit up to it."""

    id: int


@dataclass(frozen=True, slots=True)
class Processed:
    """The last :class:`Process` is done; ``rest`` are the records the PE left
    unprocessed because it stopped on one (``on_error="fail"``)."""

    rest: list[Any] | tuple[()] = ()


@dataclass(frozen=True, slots=True)
class Snapshotted:
    """The last :class:`Snapshot` is stored."""


@dataclass(frozen=True, slots=True)
class RecordError:
    """The user function raised ``error`` on ``record`` (inside a :class:`Process`)."""

    record: Any
    error: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The instance cannot go on: its state cannot be serialised (after a
    :class:`Snapshot`), a source's iterator raised (at ``position``), or the
    driver itself failed."""

    reason: str
    position: int | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """Go on with channels released from outside the instance's task (an abort)."""


PROCESSED = Processed()  # the common report: no allocation per batch
SNAPSHOTTED = Snapshotted()
START = Start()
RESUME = Resume()


# -- actions -----------------------------------------------------------------
@dataclass(slots=True)  # not frozen: one per batch (see Batch)
class Process:
    """Run the user function on ``records`` and emit its output; return the batch's
    credit (``ret``) when every record was processed. Blocks: report :class:`Processed`."""

    channel: str
    records: list[Any]
    ret: Any


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Snapshot the state for checkpoint ``checkpoint`` (a transactional sink
    pre-commits first) and report it. Blocks: report :class:`Snapshotted` or :class:`Fail`."""

    checkpoint: int


@dataclass(frozen=True, slots=True)
class ForwardBarrier:
    """Send the barrier of ``checkpoint`` on every output channel."""

    checkpoint: int


@dataclass(frozen=True, slots=True)
class ApplySwitch:
    """End, drop and replace routes as ``switch`` says, send its epoch markers, and
    resolve the wait for this switch."""

    switch: plan.Switch


@dataclass(frozen=True, slots=True)
class GateOpened:
    """The gate of ``version`` let its appearing channels through."""

    version: int


@dataclass(frozen=True, slots=True)
class ForgetInput:
    """``channel`` ended: the worker no longer routes it to this instance."""

    channel: str


@dataclass(frozen=True, slots=True)
class Restore:
    """Start from the predecessors' ``states``."""

    states: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Merge:
    """Merge the adopted predecessors' ``states`` into the running state (version
    ``version``'s adoption is complete)."""

    version: int
    states: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Released:
    """Every predecessor's state is in (or there was none): the instance runs."""


@dataclass(frozen=True, slots=True)
class ReturnCredit:
    """Return the credit of batches a retired, failed instance keeps unprocessed:
    ``batches`` holds a (channel, ret) pair per batch (see ``InstanceMachine._retire``)."""

    batches: tuple[tuple[str, Any], ...]


@dataclass(frozen=True, slots=True)
class DropState:
    """A handover from ``src``, which is not (or no longer) a predecessor, is dropped."""

    src: str


@dataclass(frozen=True, slots=True)
class Commit:
    """Checkpoint ``checkpoint`` is stored: a transactional sink commits up to it."""

    checkpoint: int


@dataclass(frozen=True, slots=True)
class Skip:
    """Skip ``record`` that raised ``error``; ``log`` says whether to log it
    (``outcome`` is what became of it)."""

    record: Any
    error: str
    outcome: str
    log: bool


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Write ``record`` (or a source's ``position``) and ``error`` to the dead letters."""

    record: Any
    error: str
    position: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """``on_error="fail"``: the instance stops at ``record``; the executor keeps it
    and the records after it as the rest of its batch."""

    record: Any
    error: str


@dataclass(frozen=True, slots=True)
class Finish:
    """End every output channel and hand state and ``unprocessed`` input (in order
    per channel) to ``retire.successors``; the instance is done."""

    retire: plan.Retire
    unprocessed: list[Any]


Event = (
    Start | Batch | End | Epoch | Barrier | Handover | Gate | Adopt | Abort | Switch | Retire
    | Checkpoint | CheckpointDone | Processed | Snapshotted | RecordError | Fail | Resume
)  # fmt: skip
Action = (
    Process | Snapshot | ForwardBarrier | ApplySwitch | GateOpened | ForgetInput | Restore
    | Merge | Released | DropState | Commit | Skip | DeadLetter | Stop | Finish | ReturnCredit
)  # fmt: skip

_NONE: list[Action] = []  # returned when nothing is to be done; never appended to


class InstanceMachine:
    """The state of one instance's inputs: what is held, aligned, gated and owed.

    ``inputs`` are the instance's input channels, ``predecessors`` the instances
    whose state it waits for, ``source`` whether it is a source (it has no inputs
    and snapshots on :class:`Checkpoint`), ``on_error`` the PE's error policy.
    """

    def __init__(
        self,
        inputs: tuple[str, ...] | list[str] = (),
        predecessors: tuple[str, ...] | list[str] = (),
        *,
        source: bool = False,
        on_error: str = "skip",
    ):
        if on_error not in ON_ERROR:
            raise ValueError(
                f"config on_error={on_error!r} is not one of "
                f"{', '.join(map(repr, ON_ERROR))}; fix the PE's config"
            )
        self.source = source
        self.on_error = on_error
        self.inputs: set[str] = set(inputs)
        # held input per channel, in arrival order: (records, ret) or (None, barrier id)
        self.held: dict[str, deque[tuple[list[Any] | None, Any]]] = {}
        self.flow: list[str] = []  # released channels, drained in this order
        # gates: version -> (appearing, disappearing channels still open)
        self.gates: dict[int, tuple[set[str], set[str]]] = {}
        self.holding: set[str] = set()
        # epochs: version -> channels that delivered its marker
        self.epochs: dict[int, set[str]] = {}
        self.epoch_held: set[str] = set()
        self.pending_switch: dict[int, tuple[plan.Switch, set[str]]] = {}
        # checkpoints: the one aligning (0: none) and the channels that still owe its barrier
        self.aligning = 0
        self.need: set[str] = set()
        self.barrier_held: set[str] = set()
        self.last_checkpoint = 0
        self.abandoned = 0  # barriers of checkpoints up to this one are ignored
        # handover
        self.pending_preds: set[str] = set(predecessors)
        self.pred_states: list[Any] = []
        self.pred_pending: list[tuple[str, list[Any]]] = []
        # adoption (a kept instance taking over a canary's keys): its version, the
        # predecessors still owed, their states, the key test, and the records of
        # the share held per channel (each list a part of one batch, in order)
        self.adopt_version = 0
        self.adopt_preds: set[str] = set()
        self.adopt_states: list[Any] = []
        self.adopt_pending: list[tuple[str, list[Any]]] = []
        self.in_share: Any = None
        self.adopt_held: dict[str, list[list[Any]]] = {}
        self.adopt_blocked: set[str] = set()  # channels whose barrier waits for the merge
        # lifecycle and errors
        self.retire: plan.Retire | None = None
        self.finished = False
        self.failed = ""  # why the instance stopped; "" while it runs
        self.errors = 0
        # the blocking action being carried out: (channel, ret) of a Process, or a checkpoint id
        self.busy: tuple[str, Any] | int | None = None

    # -- the one entry point -------------------------------------------------
    def handle(self, ev: Event) -> list[Action]:
        """Apply one event; return the actions to carry out, in order."""
        if type(ev) is Batch:
            if self.busy is not None:
                raise RuntimeError(f"InstanceMachine: a batch while {self.busy!r} is carried out")
            return self._batch(ev)
        if type(ev) is Processed:
            return self._processed(ev)
        t = type(ev)
        handler = _HANDLERS.get(t)
        if handler is None:
            raise TypeError(f"InstanceMachine: {t.__name__} is not an event")
        if self.busy is not None and t not in _WHILE_BUSY:
            raise RuntimeError(
                f"InstanceMachine: {t.__name__} while {self.busy!r} is carried out; "
                "report Processed or Snapshotted first"
            )
        return handler(self, ev)

    def blocked(self, ch: str) -> bool:
        """Whether ``ch`` is held by a gate, an epoch marker or a barrier."""
        return (
            ch in self.holding
            or ch in self.epoch_held
            or ch in self.barrier_held
            or ch in self.adopt_blocked
        )

    # -- input ---------------------------------------------------------------
    def _batch(self, ev: Batch) -> list[Action]:
        ch = ev.channel
        if (
            self.pending_preds
            or self.failed
            or ch in self.held
            or ch in self.holding
            or ch in self.epoch_held
            or ch in self.barrier_held
            or ch in self.adopt_blocked
        ):
            if self.failed and self.retire is not None and ev.ret is not None:
                self._hold(ch, (ev.records, None))  # goes to the successor (_owed_credit)
                return [ReturnCredit(((ch, ev.ret),))]
            self._hold(ch, (ev.records, ev.ret))
            return _NONE
        records = ev.records if self.in_share is None else self._adopt_split(ch, ev.records)
        self.busy = (ch, ev.ret)
        return [Process(ch, records, ev.ret)]

    def _adopt_split(self, ch: str, records: list[Any]) -> list[Any]:
        """The records of a batch to process now; those of the adopted share are held."""
        test = self.in_share
        mine = [r for r in records if test(r)]
        if not mine:
            return records
        self.adopt_held.setdefault(ch, []).append(mine)
        return [r for r in records if not test(r)]

    def _processed(self, ev: Processed) -> list[Action]:
        busy = self.busy
        if not isinstance(busy, tuple):
            raise RuntimeError(f"InstanceMachine: Processed while {busy!r} is being carried out")
        self.busy = None
        if not ev.rest and not self.flow and self.retire is None:
            return _NONE  # the common case: nothing was released meanwhile
        if ev.rest:
            # The PE stopped at a record: it and the records after it stay held (no
            # credit returned) for the upgrade that fixes the PE, which hands them on.
            ch, ret = busy
            self.held.setdefault(ch, deque()).appendleft((list(ev.rest), ret))
            self.failed = self.failed or "stopped on an error"
            return [*self._owed_credit(), *self._drain()]
        return self._drain()

    def _barrier(self, ev: Barrier) -> list[Action]:
        ch = ev.channel
        if self.failed:
            # A failed instance holds input it never processed: no checkpoint may
            # cut past it (the last complete checkpoint stays the one recovery restores).
            return _NONE
        if self.pending_preds or ch in self.held or self.blocked(ch):
            # A barrier stays behind the batches held before it on its channel:
            # the cut must include them.
            self._hold(ch, (None, ev.checkpoint))
            return _NONE
        if self.adopt_preds:
            # The cut must include the adopted keys' state and the records of the
            # share held so far: the barrier, and its channel, wait for the merge.
            self.adopt_blocked.add(ch)
            self._hold(ch, (None, ev.checkpoint))
            return _NONE
        acts = self._align(ch, ev.checkpoint)
        return acts if self.busy is not None else acts + self._drain()

    def _end(self, ev: End) -> list[Action]:
        ch = ev.channel
        if self.aligning:
            # End markers come only with a transition, and the master abandons the
            # checkpoint in flight when one begins: this alignment cannot complete
            # (a sender may have forwarded its barrier on a channel it since ended).
            # What it held is released before a gate below lets a replacing
            # channel through, so order per key holds.
            self._abandon()
        self.inputs.discard(ch)
        acts: list[Action] = [ForgetInput(ch)]
        for version, (appearing, remaining) in list(self.gates.items()):
            remaining.discard(ch)
            if not remaining:
                del self.gates[version]
                self.holding -= appearing
                self._release(appearing)
                acts.append(GateOpened(version))
        return acts + self._drain()

    def _epoch(self, ev: Epoch) -> list[Action]:
        # Records behind the marker belong after the cut: hold them until we switch.
        ch, version = ev.channel, ev.version
        self.epochs.setdefault(version, set()).add(ch)
        self.epoch_held.add(ch)
        pending = self.pending_switch.get(version)
        if pending is not None:
            pending[1].discard(ch)
            if not pending[1]:
                del self.pending_switch[version]
                return self._switch_now(pending[0])
        return _NONE

    # -- checkpoints -----------------------------------------------------------
    def _align(self, ch: str, cid: int) -> list[Action]:
        if cid <= self.last_checkpoint or cid <= self.abandoned:
            return _NONE  # completed, or given up
        if self.aligning > cid:
            return _NONE  # a newer checkpoint aligns: this one cannot complete any more
        if self.aligning and self.aligning < cid:
            # A newer checkpoint began: the older one cannot complete any more (its
            # barrier was lost on some input, or the master superseded it).
            self._abandon()
        if not self.aligning:
            # Align on the inputs open now; channels that appear later owe nothing.
            self.aligning, self.need = cid, set(self.inputs)
        self.need.discard(ch)
        self.barrier_held.add(ch)
        if self.need:
            return _NONE
        self.aligning = 0
        self.last_checkpoint = max(self.last_checkpoint, cid)
        self.busy = cid
        # The barrier goes on before the snapshot is taken: downstream aligns while
        # this instance packs its state. Nothing is processed in between, so the
        # snapshot is still the state at the barrier.
        return [ForwardBarrier(cid), Snapshot(cid)]

    def _abandon(self) -> None:
        """Give up the alignment in flight: its later barriers are ignored and the
        channels it held flow again."""
        self.abandoned = max(self.abandoned, self.aligning)
        self.aligning, self.need = 0, set()
        self._release(self.barrier_held)
        self.barrier_held = set()

    def _snapshotted(self, ev: Snapshotted) -> list[Action]:
        cid = self.busy
        if not isinstance(cid, int):
            raise RuntimeError(f"InstanceMachine: Snapshotted while {cid!r} is being carried out")
        self.busy = None
        self._release(self.barrier_held)
        self.barrier_held = set()
        if self.source:  # its barrier follows the position it snapshotted
            return [ForwardBarrier(cid), *self._drain()]
        return self._drain()

    def _checkpoint(self, ev: Checkpoint) -> list[Action]:
        if not self.source:
            return _NONE  # other instances snapshot when barriers align
        self.last_checkpoint = max(self.last_checkpoint, ev.id)
        self.busy = ev.id
        return [Snapshot(ev.id)]

    def _checkpoint_done(self, ev: CheckpointDone) -> list[Action]:
        return [Commit(ev.id)]

    # -- transitions -------------------------------------------------------------
    def _gate(self, ev: Gate) -> list[Action]:
        appearing = set(ev.appearing)
        remaining = set(ev.disappearing) & self.inputs
        self.inputs |= appearing
        if remaining and appearing:
            self.holding |= appearing
            self.gates[ev.version] = (appearing, remaining)
            return _NONE
        return [GateOpened(ev.version)]

    def _adopt(self, ev: Adopt) -> list[Action]:
        if self.adopt_preds or self.in_share is not None:
            raise RuntimeError(
                f"InstanceMachine: an adoption of version {ev.version} while that of "
                f"version {self.adopt_version} is in progress"
            )
        self.adopt_version = ev.version
        self.adopt_preds = set(ev.predecessors)
        self.in_share = ev.in_share
        return _NONE

    def _adopted(self) -> list[Action]:
        """Every adopted predecessor's state is in: merge it, then let the input the
        predecessors held and the records of the share held here flow, in that order
        and in order per channel, before anything held behind them."""
        acts: list[Action] = [Merge(self.adopt_version, tuple(self.adopt_states))]
        self._end_adoption()
        return acts + self._drain()

    def _end_adoption(self) -> None:
        """Put what the adoption held back in front of the held input and release it."""
        front: dict[str, deque[tuple[list[Any] | None, Any]]] = {
            f"handover:{pred}": deque([(records, None)]) for pred, records in self.adopt_pending
        }
        for ch, parts in self.adopt_held.items():
            q: deque[tuple[list[Any] | None, Any]] = deque((part, None) for part in parts)
            # (their batches' credit went back when the rest of each batch was processed)
            q.extend(self.held.pop(ch, ()))
            front[ch] = q
        self.held = {**front, **self.held}
        self._release(set(front) | self.adopt_blocked)
        self.adopt_preds, self.adopt_states, self.adopt_pending = set(), [], []
        self.in_share, self.adopt_held, self.adopt_blocked = None, {}, set()

    def _abort(self, ev: Abort) -> list[Action]:
        if ev.version == self.adopt_version and (self.adopt_preds or self.in_share is not None):
            # Nothing was merged (the switch never came): what was held flows as it is.
            self.adopt_states, self.adopt_pending = [], []
            self._end_adoption()
        appearing, _ = self.gates.pop(ev.version, (set(), set()))
        self.holding -= appearing
        self.inputs -= appearing
        if self.aligning and self.need & appearing:
            # The alignment waits for a barrier on a channel that is gone: it cannot
            # complete (the master abandons the checkpoint a transition spans), and
            # the channels it blocked must flow, or the next checkpoints' barriers
            # queue behind them and their cuts miss records.
            self._abandon()
        # Input that reached an aborted channel flows on the next Resume (the
        # driver sends one when ``flow`` is not empty) or with the drain in progress.
        self._release(appearing)
        return _NONE

    def _switch(self, ev: Switch) -> list[Action]:
        sw = ev.switch
        remaining = set(sw.after_epoch) - self.epochs.get(sw.version, set())
        if remaining:
            self.pending_switch[sw.version] = (sw, remaining)
            return _NONE
        return self._switch_now(sw)

    def _switch_now(self, sw: plan.Switch) -> list[Action]:
        self.epochs.pop(sw.version, None)
        if sw.after_epoch:
            after = set(sw.after_epoch)
            self.epoch_held -= after
            self._release(after)
        return [ApplySwitch(sw), *self._drain()]

    def _retire(self, ev: Retire) -> list[Action]:
        self.retire = ev.retire
        return [*self._owed_credit(), *self._drain()]

    def _owed_credit(self) -> list[Action]:
        """For a failed, retired instance: a :class:`ReturnCredit` for every held batch
        whose credit is still owed.

        A failed instance returns no credit for the input it holds, and a sender out
        of credit never reaches the switch that ends its channel: the retirement
        would wait for an end marker that cannot come. What it holds goes to its
        successor (Finish), so once it is both failed and retired the credit goes
        back, and for each batch that arrives until the end markers (``_batch``).
        """
        if not self.failed or self.retire is None:
            return _NONE
        batches = []
        for ch, q in self.held.items():
            for j, (records, ret) in enumerate(q):
                if records is not None and ret is not None:
                    batches.append((ch, ret))
                    q[j] = (records, None)  # owed no more
        return [ReturnCredit(tuple(batches))] if batches else []

    def _handover(self, ev: Handover) -> list[Action]:
        if ev.src in self.adopt_preds:
            self.adopt_preds.discard(ev.src)
            self.adopt_states.append(ev.state)
            if ev.pending:
                self.adopt_pending.append((ev.src, list(ev.pending)))
            # A new instance merges after it restored its predecessors' state.
            return _NONE if self.adopt_preds or self.pending_preds else self._adopted()
        if ev.src not in self.pending_preds:
            return [DropState(ev.src)]
        self.pending_preds.discard(ev.src)
        self.pred_states.append(ev.state)
        if ev.pending:
            self.pred_pending.append((ev.src, list(ev.pending)))
        if self.pending_preds:
            return _NONE
        acts: list[Action] = [Restore(tuple(self.pred_states)), Released()]
        self.pred_states = []
        if not self.source:
            # Input a predecessor held unprocessed (it stopped on an error) comes
            # before anything that reached this instance directly.
            handed: dict[str, deque[tuple[list[Any] | None, Any]]] = {
                f"handover:{pred}": deque([(records, None)]) for pred, records in self.pred_pending
            }
            self.held = {**handed, **self.held}
        self.pred_pending = []
        if self.in_share is not None and not self.adopt_preds:
            # The adopted state came in first: merge it now, and what the adoption
            # held goes before the rest.
            acts.append(Merge(self.adopt_version, tuple(self.adopt_states)))
            self._end_adoption()
        # Held channels that nothing still holds flow now, in arrival order.
        self._release(self.held)
        return acts + self._drain()

    def _start(self, ev: Start) -> list[Action]:
        if self.pending_preds:
            return _NONE
        return [Released()]

    def _resume(self, ev: Resume) -> list[Action]:
        return self._drain()

    # -- errors ----------------------------------------------------------------
    def _record_error(self, ev: RecordError) -> list[Action]:
        self.errors += 1
        if self.on_error == "fail":
            self.failed = self.failed or ev.error
            return [Stop(ev.record, ev.error)]
        log = self.errors <= MAX_LOGGED_ERRORS
        if self.on_error == "dead_letter":
            return [
                DeadLetter(ev.record, ev.error),
                Skip(ev.record, ev.error, "dead-lettered", log),
            ]
        return [Skip(ev.record, ev.error, "skipped", log)]

    def _fail(self, ev: Fail) -> list[Action]:
        self.errors += 1
        self.failed = self.failed or ev.reason
        self.busy = None
        self.flow.clear()
        acts = [*self._owed_credit(), *self._drain()]  # nothing flows; a retired one may finish
        if ev.position is not None and self.on_error == "dead_letter":
            return [DeadLetter(None, ev.reason, ev.position), *acts]
        return acts

    # -- held input ----------------------------------------------------------
    def _hold(self, ch: str, item: tuple[list[Any] | None, Any]) -> None:
        q = self.held.get(ch)
        if q is None:
            self.held[ch] = deque((item,))
        else:
            q.append(item)

    def _release(self, channels: set[str] | dict[str, Any]) -> None:
        """Let the held input of ``channels`` flow (unless something still holds it),
        in the order the channels were first held."""
        self.flow.extend(c for c in self.held if c in channels)

    def _drain(self) -> list[Action]:
        """Actions for released input, up to the first blocking one; then, if the
        instance is retired and nothing is owed any more, :class:`Finish`."""
        if self.busy is not None:
            return _NONE
        acts: list[Action] = _NONE
        flow, held = self.flow, self.held
        while flow and not self.pending_preds and not self.failed:
            ch = flow[0]
            q = held.get(ch)
            if q is None or self.blocked(ch):
                del flow[0]
                continue
            if q[0][0] is None and self.adopt_preds:
                # A barrier waits for the merge (see _barrier), and its channel with it.
                self.adopt_blocked.add(ch)
                del flow[0]
                continue
            records, ret = q.popleft()
            if not q:
                del held[ch]
            if acts is _NONE:
                acts = []
            if records is not None:
                if self.in_share is not None:
                    records = self._adopt_split(ch, records)
                self.busy = (ch, ret)
                acts.append(Process(ch, records, ret))
                return acts
            acts.extend(self._align(ch, ret))  # a queued barrier: ``ret`` is its id
            if self.busy is not None:
                return acts
        if self.failed or self.pending_preds:
            flow.clear()
        if self.retire is not None and not self.inputs and not self.pending_preds:
            if not self.finished:
                self.finished = True
                if acts is _NONE:
                    acts = []
                acts.append(Finish(self.retire, self._unprocessed()))
        return acts

    def _unprocessed(self) -> list[Any]:
        """Held input this instance never processed, in order per channel (what an
        adoption in progress held first: it came before the rest of its channel)."""
        if self.adopt_held or self.adopt_pending:
            self._end_adoption()
        pending = [
            r
            for q in self.held.values()
            for records, _ in q
            if records is not None  # not a queued barrier
            for r in records
        ]
        self.held.clear()
        self.flow.clear()
        return pending


_HANDLERS: dict[type, Any] = {
    Start: InstanceMachine._start,
    End: InstanceMachine._end,
    Epoch: InstanceMachine._epoch,
    Barrier: InstanceMachine._barrier,
    Handover: InstanceMachine._handover,
    Gate: InstanceMachine._gate,
    Adopt: InstanceMachine._adopt,
    Abort: InstanceMachine._abort,
    Switch: InstanceMachine._switch,
    Retire: InstanceMachine._retire,
    Checkpoint: InstanceMachine._checkpoint,
    CheckpointDone: InstanceMachine._checkpoint_done,
    Snapshotted: InstanceMachine._snapshotted,
    RecordError: InstanceMachine._record_error,
    Fail: InstanceMachine._fail,
    Resume: InstanceMachine._resume,
}

# Events that may come while a blocking action is carried out.
_WHILE_BUSY = frozenset({Gate, Adopt, Abort, RecordError, Processed, Snapshotted, Fail, Resume})
