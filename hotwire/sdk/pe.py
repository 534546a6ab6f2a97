"""Class-based PEs: the :class:`ProcessPE` ABC and the :class:`Context` the runtime hands them."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Context:
    """What a PE instance knows about itself. The runtime constructs it; user code reads it.

    ``position`` is, for a source, how many records earlier generations of this
    source instance emitted: a source that replaces another resumes from there.
    ``key`` is the current record's key while a keyed ``process`` PE handles it,
    else None. ``waiting`` names the server a connector of this instance waits
    for while it is unreachable (e.g. ``"redis://127.0.0.1:6379/0 unreachable"``),
    ``waiting_since`` when that began (``time.monotonic()``); "" and 0.0 otherwise.
    The worker reports them with its heartbeats (``streamctl status``).
    ``version`` is the app version this instance was started in (an upgrade
    that changes the PE starts new instances in the new version). ``generation``
    is the app's transition that started this instance (an upgrade, a restart, a
    move): an instance that replaces another always has a larger one, so a
    connector can fence in its server what an older instance still running (on a
    worker cut off from the master) would write. ``timers``,
    in a keyed class PE that defines ``on_timer``, registers timers for the
    current key: ``ctx.timers.event(t)`` (when the watermark reaches ``t``) and
    ``ctx.timers.processing(t)`` (at wall-clock ``time.time()`` ``t``);
    ``ctx.timers.cancel(t, kind)``.
    ``hold``, for a source or a sink, is the worker's output hold
    (``hotwire.worker.fence``): while ``hold.held()`` the master may have declared
    the worker dead and started this instance elsewhere, so a source with effects in
    its server (a delivery log) reads nothing and a transactional sink pre-commits
    nothing until ``await hold.wait()`` returns; None outside a worker.
    ``predecessors``, for a source, lists the states it took over (from the
    instances it replaces, or from a checkpoint): ``{"instance": j, "of": m,
    "position": p}`` each, instance ``j`` of ``m`` having emitted ``p`` records;
    empty on a fresh start. When ``m`` differs from ``parallelism`` (a rescale),
    every old instance is listed and ``position`` is that of the old instances
    ``j`` with ``j % parallelism == instance``.
    """

    app: str
    pe: str
    instance: int = 0
    parallelism: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    position: int = 0
    key: Any = None
    waiting: str = ""
    waiting_since: float = 0.0
    predecessors: list[dict[str, Any]] = field(default_factory=list)
    version: int = 0
    generation: int = 0
    timers: Any = None  # a keyed class PE's timers (hotwire.eventtime.Timers) if it has on_timer
    hold: Any = None  # a source's or sink's: the worker's OutputHold (hotwire.worker.fence)
    logger: logging.Logger = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.logger = logging.getLogger(f"hotwire.app.{self.app}.{self.pe}")


class ProcessPE(ABC):
    """A class-based PE. The runtime makes one object per PE instance.

    Lifecycle: ``setup(ctx)`` once, then ``restore(state)`` if the instance takes
    over state (on upgrade or rescale), then ``process`` for its records (or, if
    the subclass defines ``process_batch(records) -> list``, that per batch),
    ``snapshot()`` when it hands its state to successors, and ``teardown()`` once
    at the end.

    State schema: ``state_version`` (a class attribute, default 1) names the
    shape of what :meth:`snapshot` returns. The version travels with the state
    (checkpoints and handovers), and an instance of a class with another
    ``state_version`` calls :meth:`migrate` on it before :meth:`restore`. During
    an upgrade's prepare phase the runtime tries ``migrate``, ``validate_state``
    and ``restore`` of the new class on a sample of the state it will take over
    (from the last checkpoint) on a separate object: an exception or a
    rejection fails the upgrade and leaves the running version as it was.
    """

    state_version: int = 1

    def setup(self, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called once, before any other method, when the instance is built.

        During an upgrade this runs in the prepare phase: an exception here fails
        the upgrade and leaves the old version running. Not called again on
        restore or rescale of this object.
        """

    @abstractmethod
    def process(self, record: Any) -> Iterable[Any]:
        """Handle one record and return (or yield) the records to emit downstream.

        May be ``async def``. Called once per input record, in arrival order per
        upstream channel, never concurrently on the same object. Not called when
        the subclass defines ``process_batch``. In a keyed PE, ``ctx.key`` is
        the record's key.
        """

    # ``process_batch(self, records: list) -> list`` is optional and deliberately not
    # defined here: when a subclass defines it (sync or async), the runtime calls it
    # with each input batch instead of calling process() per record.

    @classmethod
    def batched(cls) -> bool:
        """True when the subclass defines ``process_batch(records) -> list``."""
        return callable(getattr(cls, "process_batch", None))

    def snapshot(self) -> Any:
        """Return the instance's state when it retires (upgrade or rescale); None for none.

        For a keyed PE return a mapping ``{key: state}`` so the runtime can split it
        by key among successors. Called after the last record was processed and
        before :meth:`teardown`; not called when the app is killed. The state must
        be msgpack-serialisable.
        """
        return None

    def restore(self, state: Any) -> None:  # noqa: B027 - optional hook
        """Take over state from predecessors, after :meth:`setup` and before any record.

        For a keyed PE ``state`` maps each key this instance now owns to its state
        (merged from all predecessors), in one call. Otherwise it is called once per
        predecessor whose snapshot was not None. Not called without predecessors.
        """

    # ``merge(self, state)`` is optional and deliberately not defined here: a keyed
    # subclass that defines it takes a canary's keys in while it runs: the old
    # code's instances when the canary is aborted (``streamctl canary abort``),
    # instead of being replaced, and the new code's when it is promoted, after
    # ``restore`` (they run before the canary's part is in). ``state`` maps keys
    # new to the instance to their state (after migrate and validate_state); add
    # them to the instance's own. Without it an abort replaces every instance of
    # the PE, and a promote hands every key over before the new instances run.

    def migrate(self, state: Any, from_version: int) -> Any:
        """Return ``state``, written by this PE's class at ``from_version``, in the
        shape of :attr:`state_version`; called before :meth:`restore` (and
        :meth:`validate_state`) whenever the two versions differ.

        For a keyed PE ``state`` is a mapping ``{key: state}`` (of some or all
        the keys the instance takes over; called once per predecessor's part) and
        the result must be one too. ``from_version`` may be higher than
        :attr:`state_version` (a rollback). The default refuses: a class that
        changes ``state_version`` must say how to carry the old state over.
        """
        raise ValueError(
            f"state of version {from_version} cannot be restored by {type(self).__name__} "
            f"(state_version {self.state_version}): define migrate(state, from_version)"
        )

    def validate_state(self, state: Any) -> bool:
        """Return False (or raise) to refuse ``state`` before :meth:`restore` takes it.

        Called with the state in this class's shape (after :meth:`migrate`), on
        the state sample checked in an upgrade's prepare phase and on every real
        restore. The default accepts everything.
        """
        return True

    # ``on_timer(self, t, kind) -> iterable`` is optional and deliberately not defined
    # here: a keyed subclass that defines it gets ``ctx.timers``; it is called with
    # ``ctx.key`` set when a timer of ``kind`` ("event" or "processing") at ``t`` is
    # due, and returns (or yields) records to emit. Timers are kept in the state
    # (checkpoints, handovers) and move with their keys on a rescale.

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Called once when the instance stops: retired after an upgrade, or app killed.

        Release resources here. Not called if :meth:`setup` raised.
        """
