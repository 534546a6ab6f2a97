"""What each PE kind does with a batch of input records.

An executor turns one input batch into one output batch; the instance around it
(``hotwire.worker.instance``) handles channels, gating, markers and handover.
Sync callables run on a fast path over the whole batch; when a record raises,
exactly that record is reported and skipped and the batch goes on from the next
one: user code runs once per record, so side effects are never applied twice.

A slow user function must not starve the worker's event loop (heartbeats,
control stream, data-plane reads): executors give the loop a turn whenever
:data:`YIELD_S` of user code has run within a batch.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import types
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from itertools import chain
from operator import length_hint
from typing import Any

from hotwire.codec import hashable_key
from hotwire.pe.state import DEFAULT_VERSION, REPLICATED_KEY, unwrap, wrap
from hotwire.sinks import TransactionalSink

# Called with a failing record and the error; returns False when the PE stops
# (on_error="fail"): the executor then stops at that record and keeps it, and
# every record after it, in ``rest`` for the instance to hold.
ErrorHook = Callable[[Any, BaseException], "bool | None"]

YIELD_S = 0.01  # longest run of user code within a batch before the loop gets a turn
SLICE = 256  # records per fast-path slice of a sync map, filter or flat_map
EACH_SLICE = 32  # records between clock checks for sinks, reduce and class PEs

_consume = deque(maxlen=0).extend  # runs an iterator to its end and keeps nothing


def _check_ran_to_end(it: Iterator[Any]) -> None:
    """Raise if ``map``/``filter`` stopped before the end of the list iterator ``it``.

    A user function that raises StopIteration (a ``next()`` on an empty iterator, say)
    ends ``map`` and ``filter`` as if their input had ended, and the rest of the slice
    would be skipped without a word. A list iterator's ``__reduce__`` carries its
    index until it is exhausted, which tells the two apart; the record it stopped on
    is then reported like any other failure.
    """
    if len(it.__reduce__()) == 3:
        raise RuntimeError("the function raised StopIteration")


def _direct(fn: Any) -> Any:
    """``fn``, or for an instance of a class with a Python ``__call__`` (a sink
    object, say) its bound ``__call__``, bound once: calling the instance binds it on
    every call (a minimal counting sink object: 86 ns a record, against 60 bound)."""
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's method, not callable()
    if isinstance(call, types.FunctionType) and not isinstance(fn, type):
        return fn.__call__
    return fn


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


class Executor:
    """Base: a stateless PE. Subclasses override :meth:`process`."""

    keyed = False

    def __init__(self, fn: Any, ctx: Any, on_error: ErrorHook, key_fn: Any = None):
        self.fn = _direct(fn)
        self.ctx = ctx
        self.on_error = on_error
        self.key_fn = key_fn
        self.is_async = _is_async(fn)
        self.rest: list[Any] = []  # input left unprocessed when the PE stopped on an error

    def take_rest(self) -> list[Any]:
        rest, self.rest = self.rest, []
        return rest

    async def setup(self) -> None:
        return None

    async def process(self, records: list[Any]) -> list[Any]:
        raise NotImplementedError

    def snapshot(self) -> Any:
        return None

    def restore(self, states: list[Any]) -> None:
        return None

    def cannot_merge(self) -> str:
        """Why the running instance cannot take other instances' keyed state in
        (:meth:`merge`); "" when it can."""
        return "only a keyed PE (a reduce, or a keyed class PE with merge()) can"

    def merge(self, states: list[Any]) -> None:
        """Add other instances' keyed ``states`` (their keys are new to this one)
        to the running state."""
        raise RuntimeError(self.cannot_merge())

    def versioned(self, state: Any) -> Any:
        """``state`` (a snapshot or a part of it) as it travels: with its version."""
        return state

    async def teardown(self) -> None:
        return None

    async def _each(self, records: list[Any], step: Callable[[Any], Any]) -> None:
        """Apply ``step`` to each record once, reporting and skipping failures.

        Sync steps run in C-level iteration over slices of :data:`EACH_SLICE` records;
        slow user code yields to the event loop every :data:`YIELD_S` (checked
        between slices, and every 32 records for async steps), so one long batch
        does not stall the worker's other PEs.
        """
        n, start = len(records), 0
        clock = time.monotonic
        deadline = clock() + YIELD_S
        while start < n:
            i = start  # the record being processed
            try:
                if self.is_async:
                    for i in range(start, n):
                        await step(records[i])
                        if not (i & 31) and clock() > deadline:
                            break
                    start = i + 1
                else:
                    end = min(n, start + EACH_SLICE)
                    it = iter(records[start:end])
                    try:
                        _consume(map(step, it))  # at C speed, no Python loop per record
                        _check_ran_to_end(it)
                    except Exception:
                        i = end - 1 - length_hint(it)  # the iterator is past the failing one
                        raise
                    start = end
            except Exception as e:
                bad = i
                if self.on_error(records[bad], e) is False:
                    self.rest = records[bad:]
                    return
                start = bad + 1
            if start < n and clock() > deadline:
                await asyncio.sleep(0)
                deadline = clock() + YIELD_S

    async def _slices(self, records: list[Any], fast: Callable[[Iterator[Any]], None]) -> None:
        """Sync fast path: ``fast`` consumes an iterator over a slice at C speed.

        When user code raises, the iterator has been consumed up to and including
        the failing record: that record is reported and ``fast`` goes on with the
        rest of the slice. No record is processed twice, so side effects in a map
        or filter happen once per record.
        """
        n = len(records)
        clock = time.monotonic
        deadline = clock() + YIELD_S
        for i in range(0, n, SLICE):
            part = records if n <= SLICE else records[i : i + SLICE]
            it = iter(part)
            while True:
                try:
                    fast(it)
                    _check_ran_to_end(it)
                    break
                except Exception as e:
                    bad = len(part) - length_hint(it) - 1
                    if self.on_error(part[bad], e) is False:
                        self.rest = part[bad:] + records[i + SLICE :] if n > SLICE else part[bad:]
                        return
            if clock() > deadline:
                await asyncio.sleep(0)
                deadline = clock() + YIELD_S


class MapExecutor(Executor):
    async def process(self, records: list[Any]) -> list[Any]:
        fn = self.fn
        out: list[Any] = []
        if not self.is_async:
            await self._slices(records, lambda it: out.extend(map(fn, it)))
            return out

        async def astep(r: Any) -> None:
            out.append(await fn(r))

        await self._each(records, astep)
        return out


class FilterExecutor(Executor):
    async def process(self, records: list[Any]) -> list[Any]:
        fn = self.fn
        out: list[Any] = []
        if not self.is_async:
            await self._slices(records, lambda it: out.extend(filter(fn, it)))
            return out

        async def astep(r: Any) -> None:
            if await fn(r):
                out.append(r)

        await self._each(records, astep)
        return out


class FlatMapExecutor(Executor):
    async def process(self, records: list[Any]) -> list[Any]:
        fn = self.fn
        out: list[Any] = []
        if not self.is_async:
            await self._slices(records, lambda it: out.extend(chain.from_iterable(map(fn, it))))
            return out

        async def astep(r: Any) -> None:
            out.extend(await fn(r))

        await self._each(records, astep)
        return out


class IdentityExecutor(Executor):
    async def process(self, records: list[Any]) -> list[Any]:
        return records


class SinkExecutor(Executor):
    async def process(self, records: list[Any]) -> list[Any]:
        await self._each(records, self.fn)
        return []


class ReduceExecutor(Executor):
    """Keyed state: ``fn(acc | None, record) -> acc``; emits ``(key, acc)``."""

    keyed = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.state: dict[Any, Any] = {}

    async def process(self, records: list[Any]) -> list[Any]:
        fn, key_fn, state = self.fn, self.key_fn, self.state
        out: list[Any] = []

        def step(r: Any) -> None:
            k = key_fn(r)
            acc = fn(state.get(k), r)
            state[k] = acc
            out.append((k, acc))

        async def astep(r: Any) -> None:
            k = key_fn(r)
            acc = await fn(state.get(k), r)
            state[k] = acc
            out.append((k, acc))

        await self._each(records, astep if self.is_async else step)
        return out

    def snapshot(self) -> Any:
        return self.state

    def restore(self, states: list[Any]) -> None:
        for s in states:
            if s:
                self.state.update(s if isinstance(s, dict) else _keyed_items(s))

    def cannot_merge(self) -> str:
        return ""

    def merge(self, states: list[Any]) -> None:
        self.restore(states)


def _keyed_dict(s: Any) -> dict[Any, Any]:
    """A keyed state (a dict, or ``[key, value]`` pairs) as a dict of its own: a copy,
    since a handover on one worker passes the predecessor's object itself."""
    try:
        return dict(s)  # a dict, or pairs whose keys are hashable as they are
    except TypeError:  # a tuple key that came back from msgpack as a list
        return {hashable_key(k): v for k, v in s}


def _merged(parts: list[Any]) -> dict[Any, Any]:
    """The keyed states ``parts`` (dicts, keys disjoint) as one dict; a lone dict is
    taken as it is (restoring a handover copies 25,000 keys once, not three times)."""
    if len(parts) == 1 and type(parts[0]) is dict:
        return parts[0]
    merged: dict[Any, Any] = {}
    for p in parts:
        merged.update(p)
    return merged


def _keyed_items(s: Any) -> list[tuple[Any, Any]]:
    # Keyed state crosses the wire as a list of [key, value] pairs, since msgpack
    # map keys must be hashable once decoded (a list key is not).
    if isinstance(s, dict):
        return list(s.items())
    return [(hashable_key(k), v) for k, v in s]


class StateCheckError(Exception):
    """A class PE's new code cannot take over a state: which key, and why."""

    def __init__(self, key: Any, from_version: int, to_version: int, error: BaseException):
        self.key = key
        self.error = error
        where = f"key {key!r}" if key is not None else "its state"
        versions = (
            f" (state_version {from_version} -> {to_version})" if from_version != to_version else ""
        )
        text = " ".join(str(error).split()) or "no message"
        super().__init__(f"{where}{versions}: {type(error).__name__}: {text}")


class ProcessExecutor(Executor):
    """A class PE: one object per instance; ``process(record) -> iterable``."""

    def __init__(self, cls: Any, ctx: Any, on_error: ErrorHook, key_fn: Any = None):
        self.obj = cls()
        super().__init__(self.obj.process, ctx, on_error, key_fn)
        self.keyed = key_fn is not None
        batch = getattr(self.obj, "process_batch", None)
        self.batch_fn = batch if callable(batch) else None
        # Timers, for a keyed class that defines on_timer(t, kind).
        self.timers: Any = None
        self.on_timer = getattr(self.obj, "on_timer", None)
        if self.keyed and callable(self.on_timer):
            from hotwire.eventtime import Timers

            self.timers = Timers(ctx)
            if hasattr(ctx, "timers"):
                ctx.timers = self.timers

    async def setup(self) -> None:
        setup = getattr(self.obj, "setup", None)
        if setup is None:
            return
        if _is_async(setup):
            await setup(self.ctx)
        else:
            # A slow setup (starting a job, loading a model) must not stall other PEs.
            await asyncio.to_thread(setup, self.ctx)

    async def process(self, records: list[Any]) -> list[Any]:
        if self.batch_fn is not None and not self.keyed:
            try:
                res = self.batch_fn(records)
                if inspect.isawaitable(res):
                    res = await res
                return list(res)
            except Exception as e:
                for j, r in enumerate(records):
                    if self.on_error(r, e) is False:
                        self.rest = records[j:]
                        break
                return []
        fn, ctx, key_fn = self.fn, self.ctx, self.key_fn
        out: list[Any] = []

        def step(r: Any) -> None:
            if key_fn is not None:
                ctx.key = key_fn(r)
            res = fn(r)
            if res is not None:
                out.extend(res)

        async def astep(r: Any) -> None:
            if key_fn is not None:
                ctx.key = key_fn(r)
            res = await fn(r)
            if res is not None:
                out.extend(res)

        await self._each(records, astep if self.is_async else step)
        return out

    def snapshot(self) -> Any:
        snap = getattr(self.obj, "snapshot", None)
        state = snap() if snap is not None else None
        if self.timers:
            # A split by key gives each part the timers of its keys.
            state = _keyed_dict(state) if state else {}
            state[REPLICATED_KEY] = {"timers": self.timers.snapshot()}
        return state

    def fire_timers(self, kind: str, now: float) -> list[Any]:
        """Call ``on_timer(t, kind)`` for each timer of ``kind`` due at ``now`` (the
        watermark, or the wall clock), with ``ctx.key`` set; what they return."""
        timers, ctx, out = self.timers, self.ctx, []
        if not timers:
            return out
        for key, t in timers.due(kind, now):
            ctx.key = key
            try:
                res = self.on_timer(t, kind)
                if res is not None:
                    out.extend(res)
            except Exception as e:
                self.on_error({"timer": t, "kind": kind, "key": key}, e)
        ctx.key = None
        return out

    def _take_replicated(self, items: dict[Any, Any]) -> None:
        """Restore the instance's own entry of a keyed state (the timers of its
        keys: a split by key gave it those), if any."""
        extra = items.pop(REPLICATED_KEY, None)
        if isinstance(extra, dict) and self.timers is not None:
            self.timers.restore(extra.get("timers", ()))

    @property
    def state_version(self) -> int:
        return int(getattr(self.obj, "state_version", DEFAULT_VERSION))

    def versioned(self, state: Any) -> Any:
        if state is None or (self.keyed and not state):
            return state
        return wrap(state, self.state_version)

    def _migrated(self, state: Any, version: int) -> Any:
        """``state`` of ``version`` in this class's shape: ``migrate`` it if needed."""
        if version == self.state_version:
            return state
        migrate = getattr(self.obj, "migrate", None)
        if migrate is None:
            raise ValueError(
                f"state of version {version} cannot be restored by {type(self.obj).__name__} "
                f"(state_version {self.state_version}): define migrate(state, from_version)"
            )
        return migrate(state, version)

    def _validated(self, state: Any) -> Any:
        validate = getattr(self.obj, "validate_state", None)
        if validate is not None and validate(state) is False:
            raise ValueError("validate_state() refused the state")
        return state

    def restore(self, states: list[Any]) -> None:
        restore = getattr(self.obj, "restore", None)
        if self.keyed:
            parts: list[Any] = []
            for s in states:
                state, version = unwrap(s)
                if state:
                    items = _keyed_dict(state)
                    self._take_replicated(items)
                    if items:
                        parts.append(self._migrated(items, version))
            merged = _merged(parts)
            if restore is not None:
                restore(self._validated(merged) if merged else merged)
            return
        if restore is None:
            return
        for s in states:
            state, version = unwrap(s)
            if state is not None:
                restore(self._validated(self._migrated(state, version)))

    def cannot_merge(self) -> str:
        if not self.keyed:
            return "its state is not keyed"
        if self.timers is not None:
            return "it keeps timers (on_timer)"
        if not callable(getattr(self.obj, "merge", None)):
            return f"{type(self.obj).__name__} defines no merge(state)"
        return ""

    def merge(self, states: list[Any]) -> None:
        """Each state's keys, migrated and validated as for :meth:`restore`, go to
        the class's ``merge``: once, all states together, when there are any."""
        parts: list[Any] = []
        for s in states:
            state, version = unwrap(s)
            if state:
                parts.append(self._migrated(_keyed_dict(state), version))
        merged = _merged(parts)
        if merged:
            self.obj.merge(self._validated(merged))

    def check_state(self, states: list[Any]) -> int:
        """Try ``migrate``, ``validate_state`` and ``restore`` on ``states``; the
        number of keys (or, not keyed, states) tried.

        Keyed state is tried one key at a time, so a failure names its key.
        Raises :class:`StateCheckError`. Used on an object of its own, never on
        the instance that will process records (restore is not undone).
        """
        restore = getattr(self.obj, "restore", None)
        tried = 0
        for s in states:
            state, version = unwrap(s)
            if self.keyed:
                items = _keyed_items(state) if state else []
            else:
                items = [] if state is None else [(None, state)]
            for key, value in items:
                if self.keyed and key == REPLICATED_KEY:
                    continue  # the instance's own entry (timers), not a key's state
                try:
                    if self.keyed:
                        part = self._validated(self._migrated({key: value}, version))
                    else:
                        part = self._validated(self._migrated(value, version))
                    if restore is not None:
                        restore(part)
                except Exception as e:
                    raise StateCheckError(key, version, self.state_version, e) from e
                tried += 1
        return tried

    async def teardown(self) -> None:
        td = getattr(self.obj, "teardown", None)
        if td is None:
            return
        if _is_async(td):
            await td()
        else:
            await asyncio.to_thread(td)  # stopping a job may take a while


EXECUTORS: dict[str, type[Executor]] = {
    "map": MapExecutor,
    "filter": FilterExecutor,
    "flat_map": FlatMapExecutor,
    "union": IdentityExecutor,
    "sink": SinkExecutor,
    "reduce": ReduceExecutor,
    "process": ProcessExecutor,
    "dl_job": ProcessExecutor,
}


def _server_of(obj: Any) -> str:
    """A sink's ``server()`` before its ``setup`` ran (it may need what setup sets)."""
    try:
        return str(obj.server())
    except Exception:
        return f"the server of {type(obj).__name__}"


class TransactionalSinkExecutor(Executor):
    """A :class:`hotwire.sinks.TransactionalSink` class: one object per instance.

    Its state is the list of pre-committed, not yet committed transactions as
    ``[checkpoint id, handle]`` pairs; a handle commits when that checkpoint is
    complete, or at once when a recovery restores it (its checkpoint completed).
    """

    def __init__(self, cls: Any, ctx: Any, on_error: ErrorHook, key_fn: Any = None):
        self.obj = cls()
        super().__init__(self.obj.write, ctx, on_error, key_fn)
        self.pending: list[list[Any]] = []
        self._token = uuid.uuid4().hex[:12]
        self._txns = 0

    def _begin(self) -> None:
        self._txns += 1
        self.obj.begin(
            f"{self.ctx.app}.{self.ctx.pe}.{self.ctx.instance}.{self._token}.{self._txns}"
        )

    async def setup(self, wait: bool = False) -> None:
        """The sink object's ``setup``. With ``wait`` (an instance started outside a
        user's request), retried with backoff while its server is unreachable
        (``is_transient``); without, its error fails the start (a submit or an
        upgrade is refused with it)."""
        from hotwire.connectors.outage import Outage, retry

        if wait:
            outage = self.outage = Outage(self.ctx, _server_of(self.obj))

            def attempt() -> None:
                try:
                    self.obj.setup(self.ctx)
                finally:  # a sink may know its server only once setup began
                    outage.server = _server_of(self.obj)

            await retry(attempt, outage, self.obj.is_transient)
        else:
            await asyncio.to_thread(self.obj.setup, self.ctx)
        self._begin()
        self.outage = Outage(self.ctx, self.obj.server())

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread, retried with backoff while the sink's server is
        unreachable (``is_transient``); the instance waits, the event loop does not."""
        from hotwire.connectors.outage import retry

        return await retry(lambda: fn(*args), self.outage, self.obj.is_transient)

    async def process(self, records: list[Any]) -> list[Any]:
        await self._each(records, self.fn)
        if type(self.obj).flush is not TransactionalSink.flush and self.obj.flush_due():
            failed = await self._call(self.obj.flush)
            for i, (record, exc) in enumerate(failed):
                if self.on_error(record, exc) is False:
                    self.rest = [r for r, _ in failed[i:]]
                    break
        return []

    def pre_commit(self, checkpoint: int) -> None:
        """At a barrier (or retirement): the open transaction joins the pending ones."""
        handle = self.obj.pre_commit()
        if handle is not None:
            self.pending.append([checkpoint, handle])
        self._begin()

    async def apre_commit(self, checkpoint: int) -> None:
        """:meth:`pre_commit` off the event loop, waiting out an unreachable server.

        Not while the worker holds its output (it stood still, and the master may
        have restarted this instance elsewhere and rolled back what it left): a
        transaction prepared then would be left in the server, in doubt."""
        hold = getattr(self.ctx, "hold", None)
        if hold is not None and hold.held():
            await hold.wait()
        handle = await self._call(self.obj.pre_commit)
        if handle is not None:
            self.pending.append([checkpoint, handle])
        self._begin()

    def checkpoint_complete(self, checkpoint: int) -> None:
        """Checkpoint ``checkpoint`` is stored: commit what it covers, in order."""
        done = [p for p in self.pending if p[0] <= checkpoint]
        for _cid, handle in done:
            self.obj.commit(handle)
        self.pending = [p for p in self.pending if p[0] > checkpoint]

    async def acheckpoint_complete(self, checkpoint: int) -> None:
        """:meth:`checkpoint_complete` off the event loop, waiting out an unreachable
        server (commit is idempotent, so a commit retried after a lost reply is too)."""
        while self.pending and self.pending[0][0] <= checkpoint:
            await self._call(self.obj.commit, self.pending[0][1])
            self.pending.pop(0)

    def commit_all(self) -> None:
        """Commit every pending transaction (a recovery restored them, or the sink
        is removed by an upgrade and nothing can replay into it)."""
        handles = [handle for _cid, handle in self.pending]
        for handle in handles:
            self.obj.commit(handle)
        self.pending = []
        self.obj.recover(handles)

    async def acommit_all(self) -> None:
        """:meth:`commit_all` off the event loop, waiting out an unreachable server."""
        handles = [handle for _cid, handle in self.pending]
        for handle in handles:
            await self._call(self.obj.commit, handle)
        self.pending = []
        await self._call(self.obj.recover, handles)

    def snapshot(self) -> Any:
        return {"pending": [list(p) for p in self.pending]}

    def restore(self, states: list[Any]) -> None:
        for s in states:
            if isinstance(s, dict):
                self.pending.extend(list(p) for p in s.get("pending", ()))
        self.pending.sort(key=lambda p: p[0])

    async def teardown(self) -> None:
        self.obj.abort()
        await asyncio.to_thread(self.obj.teardown)
