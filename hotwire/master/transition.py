"""One transition of an app as a pure state machine: events in, actions out.

Every change the master makes to an app (a submit, an upgrade or rollback, a
restart from a checkpoint, instances moved off a worker, a transition a crashed
master left half done) goes through the same steps::

    store the intent (phase "prepare") -> PREPARE on every worker of the plan
      every worker prepared -> store the intent (phase "switch") -> SWITCH on every worker
        every worker switched -> store the commit -> reply COMMITTED
        one failed or timed out -> clear the intent -> restart the running version
            from its last checkpoint (or stop a new app) -> reply RESTARTED (STOPPED)
      one refused or timed out -> ABORT on every worker -> clear the intent -> reply ABORTED

A phase decides only once every worker of the plan answered (or its timer fired):
a worker is never told to abort while its own prepare may still be running.
Answers from another phase, from workers outside the plan or a second answer
from the same worker are ignored, so late and duplicated replies change nothing.

:class:`Transition` holds no sockets, clocks, tasks or store: the engine
(:mod:`hotwire.master.engine`) carries out the actions and feeds back what
happened, and a unit test can drive it through every interleaving.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Phase(enum.Enum):
    START = "start"
    STORE_PREPARE = "store-prepare"  # waiting for the intent to be durable
    PREPARE = "prepare"
    STORE_SWITCH = "store-switch"
    SWITCH = "switch"
    COMMIT = "commit"  # waiting for the commit to be durable
    ABORT = "abort"
    CLEAR = "clear"  # waiting for the intent to be removed
    RECOVER = "recover"  # restarting from the checkpoint, or stopping a new app
    DONE = "done"


class Fallback(enum.Enum):
    """What a failed switch leaves behind, since the app is then half switched."""

    RESTART = "restart"  # restart the running version from its last checkpoint
    STOP = "stop"  # stop the app everywhere: a new app has nothing to go back to
    NONE = "none"  # report it: the caller recovers (a restart from a checkpoint itself)


class Result(enum.Enum):
    COMMITTED = "committed"  # every worker switched and the store recorded it
    ABORTED = "aborted"  # undone in prepare: nothing switched anywhere
    RESTARTED = "restarted"  # the switch failed; the running version restarted
    STOPPED = "stopped"  # the switch of a new app failed; it was stopped
    FAILED = "failed"  # see Reply.error (and Reply.recovery_error)


# -- events ---------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    worker: str


@dataclass(frozen=True)
class PrepareRefused:
    worker: str
    error: str


@dataclass(frozen=True)
class Switched:
    worker: str


@dataclass(frozen=True)
class SwitchRefused:
    worker: str
    error: str


@dataclass(frozen=True)
class AbortDone:
    """A worker answered the abort, or could not be reached (it drops what it
    prepared when it registers again)."""

    worker: str


@dataclass(frozen=True)
class TimedOut:
    phase: Phase


@dataclass(frozen=True)
class Stored:
    """A store write is durable: ``write`` is the ``write`` of the action that asked
    for it, so an answer to an earlier write is never taken for a later one."""

    write: str


@dataclass(frozen=True)
class StoreFailed:
    write: str
    error: str


@dataclass(frozen=True)
class RecoveryDone:
    """The restart from the checkpoint (or the stop of a new app) finished."""

    error: str = ""


Event = (
    Prepared
    | PrepareRefused
    | Switched
    | SwitchRefused
    | AbortDone
    | TimedOut
    | Stored
    | StoreFailed
    | RecoveryDone
)


# -- actions --------------------------------------------------------------
@dataclass(frozen=True)
class StoreIntent:
    """Record the transition and its phase ("prepare" or "switch") durably, so a
    master that crashes midway undoes (prepare) or finishes (switch) it."""

    phase: str

    @property
    def write(self) -> str:
        return self.phase


@dataclass(frozen=True)
class SendPrepare:
    worker: str


@dataclass(frozen=True)
class SendSwitch:
    worker: str


@dataclass(frozen=True)
class SendAbort:
    worker: str


@dataclass(frozen=True)
class StartTimer:
    """Answer :class:`TimedOut` for ``phase`` once the phase's time is up."""

    phase: Phase


@dataclass(frozen=True)
class ClearIntent:
    write = "clear"


@dataclass(frozen=True)
class StoreCommit:
    """The new version (or placement) becomes the app's state; store it."""

    write = "commit"


@dataclass(frozen=True)
class RestartFromCheckpoint:
    pass


@dataclass(frozen=True)
class StopEverywhere:
    pass


@dataclass(frozen=True)
class Reply:
    """The last action: the transition is over and the app's lock may go."""

    result: Result
    error: str = ""  # why it did not commit
    recovery_error: str = ""  # why the restart after a failed switch failed too


Action = (
    StoreIntent
    | SendPrepare
    | SendSwitch
    | SendAbort
    | StartTimer
    | ClearIntent
    | StoreCommit
    | RestartFromCheckpoint
    | StopEverywhere
    | Reply
)


# The store write each phase waits for.
_WRITES = {
    Phase.STORE_PREPARE: "prepare",
    Phase.STORE_SWITCH: "switch",
    Phase.COMMIT: "commit",
    Phase.CLEAR: "clear",
}


class Transition:
    """The steps of one transition of ``app`` over ``workers`` (the plan's workers).

    ``resume`` starts a transition a crashed master left in its store: "prepare"
    aborts it on every worker, "switch" sends the switch again (workers join the
    first one) and commits it.
    """

    def __init__(
        self,
        app: str,
        workers: Iterable[str],
        fallback: Fallback = Fallback.RESTART,
        resume: str = "",
    ):
        if resume not in ("", "prepare", "switch"):
            raise ValueError(f"cannot resume a transition in phase {resume!r}")
        self.app = app
        self.workers = tuple(sorted(set(workers)))
        self.fallback = fallback
        self.resume = resume
        self.phase = Phase.START
        self.answers: dict[str, str] = {}  # worker -> "" (done) or its error, this phase
        self.error = ""  # the first failure: why it aborts or why the switch failed
        self.cleared_after = Phase.START  # the phase (ABORT or SWITCH) that led to CLEAR
        self.reply: Reply | None = None

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def start(self) -> list[Action]:
        if self.phase is not Phase.START:
            raise RuntimeError(f"app {self.app!r}: the transition has already started")
        if self.resume == "prepare":
            return self._abort("a master restarted while it was prepared")
        if self.resume == "switch":
            return self._enter_workers(Phase.SWITCH, SendSwitch)
        self.phase = Phase.STORE_PREPARE
        return [StoreIntent("prepare")]

    def handle(self, ev: Event) -> list[Action]:
        """The actions that ``ev`` calls for; none when it is stale or out of place."""
        phase = self.phase
        if isinstance(ev, TimedOut):
            if ev.phase is not phase or phase not in (Phase.PREPARE, Phase.SWITCH, Phase.ABORT):
                return []
            for w in self.workers:
                self.answers.setdefault(w, f"worker {w!r} did not answer the {phase.value} in time")
            return self._decide()
        if phase is Phase.PREPARE and isinstance(ev, Prepared | PrepareRefused):
            return self._answer(ev.worker, ev.error if isinstance(ev, PrepareRefused) else "")
        if phase is Phase.SWITCH and isinstance(ev, Switched | SwitchRefused):
            return self._answer(ev.worker, ev.error if isinstance(ev, SwitchRefused) else "")
        if phase is Phase.ABORT and isinstance(ev, AbortDone):
            return self._answer(ev.worker, "")
        if phase is Phase.RECOVER and isinstance(ev, RecoveryDone):
            if ev.error:
                return self._reply(Result.FAILED, recovery_error=ev.error)
            stopped = self.fallback is Fallback.STOP
            return self._reply(Result.STOPPED if stopped else Result.RESTARTED)
        if not isinstance(ev, Stored | StoreFailed) or ev.write != _WRITES.get(phase):
            return []
        failed = ev.error if isinstance(ev, StoreFailed) else ""
        if phase is Phase.STORE_PREPARE:
            if failed:
                self.error = f"the transition could not be recorded, nothing changed: {failed}"
                return self._reply(Result.FAILED)
            return self._enter_workers(Phase.PREPARE, SendPrepare)
        if phase is Phase.STORE_SWITCH:
            if failed:
                return self._abort(f"the switch could not be recorded: {failed}")
            return self._enter_workers(Phase.SWITCH, SendSwitch)
        if phase is Phase.COMMIT:
            if failed:
                self.error = f"every worker switched but the store did not record it: {failed}"
                return self._reply(Result.FAILED)
            return self._reply(Result.COMMITTED)
        if phase is Phase.CLEAR:
            # A failure to clear leaves an intent that a restarted master undoes (its
            # phase is still "prepare") or replaces (a restart records its own).
            if self.cleared_after is Phase.ABORT:
                return self._reply(Result.ABORTED)
            if self.fallback is Fallback.NONE:
                return self._reply(Result.FAILED)
            self.phase = Phase.RECOVER
            if self.fallback is Fallback.STOP:
                return [StopEverywhere()]
            return [RestartFromCheckpoint()]
        return []

    # ------------------------------------------------------------------
    def _enter_workers(self, phase: Phase, send: type[SendPrepare | SendSwitch]) -> list[Action]:
        self.phase = phase
        self.answers = {}
        actions: list[Action] = [StartTimer(phase)]
        actions += [send(w) for w in self.workers]
        return actions + self._decide()

    def _answer(self, worker: str, error: str) -> list[Action]:
        if worker not in self.workers or worker in self.answers:
            return []
        self.answers[worker] = error
        return self._decide()

    def _decide(self) -> list[Action]:
        """Once every worker answered this phase: the next step."""
        if len(self.answers) < len(self.workers):
            return []
        first = next((self.answers[w] for w in self.workers if self.answers[w]), "")
        if self.phase is Phase.PREPARE:
            if first:
                return self._abort(first)
            self.phase = Phase.STORE_SWITCH
            return [StoreIntent("switch")]
        if self.phase is Phase.SWITCH:
            if first:
                self.error = f"switch failed: {first}"
                return self._clear(Phase.SWITCH)
            self.phase = Phase.COMMIT
            return [StoreCommit()]
        if self.phase is Phase.ABORT:
            return self._clear(Phase.ABORT)
        return []

    def _abort(self, error: str) -> list[Action]:
        self.error = (
            f"the change failed in prepare and was undone; the running version is "
            f"unchanged: {error}"
        )
        self.phase = Phase.ABORT
        self.answers = {}
        actions: list[Action] = [StartTimer(Phase.ABORT)]
        actions += [SendAbort(w) for w in self.workers]
        return actions + self._decide()

    def _clear(self, after: Phase) -> list[Action]:
        self.cleared_after = after
        self.phase = Phase.CLEAR
        return [ClearIntent()]

    def _reply(self, result: Result, recovery_error: str = "") -> list[Action]:
        self.phase = Phase.DONE
        self.reply = Reply(result, self.error, recovery_error)
        return [self.reply]
