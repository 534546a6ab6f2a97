"""Failures and checkpoints: what the master does when things go wrong.

* **Checkpoints.** Every ``checkpoint_interval`` seconds the master asks the
  source instances of each running app to snapshot their position and send a
  barrier down every channel; each instance aligns the barriers of its inputs,
  snapshots its state and reports it. When every instance of the app reported,
  the checkpoint is stored durably in the master's SQLite store.
* **Worker failure.** A worker that misses heartbeats for ``heartbeat_timeout`` is
  dead. Every app with instances on it restarts from its last checkpoint on the
  live workers: the surviving instances stop, all instances are placed anew and
  start with their checkpointed state, and sources resume from their
  checkpointed position, replaying what came after it (at-least-once; a sink
  that deduplicates by sequence number makes the result exactly-once).
* **Drain.** A worker asked to stop (SIGTERM) first has its instances moved to
  the other workers with the upgrade protocol itself: state handed over, no
  record lost or duplicated.
* **An interrupted transition.** A master that crashed during an upgrade undoes
  it on start (crash in prepare: abort everywhere) or finishes it (crash in
  switch: the switch is sent again; workers join the first one).

Recovery decides when and what; every change to an app it makes (a restart, a
move, finishing an interrupted transition) goes through the master's
:class:`~hotwire.master.engine.TransitionEngine`, under the app's lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hotwire.master.engine import Refused, TransitionEngine
from hotwire.master.membership import Membership
from hotwire.proto import hotwire_pb2 as pb

log = logging.getLogger(__name__)

CHECKPOINT_TIMEOUT_S = 10.0


@dataclass
class PendingCheckpoint:
    id: int
    epoch: int
    expected: set[str]
    started: float
    states: dict[str, bytes] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Recovery:
    def __init__(
        self,
        engine: TransitionEngine,
        membership: Membership,
        spawn: Callable[..., Any],
        checkpoint_interval: float = 2.0,
    ):
        self.engine = engine
        self.ms = membership
        self.spawn = spawn  # runs a task the master owns (cancelled when it closes)
        self.checkpoint_interval = checkpoint_interval
        self.pending: dict[str, PendingCheckpoint] = {}
        self.last_checkpoint: dict[str, int] = {}
        self.handled: set[str] = set()  # dead workers already dealt with
        self.deaf_since = 0.0  # when the master last began to hear from no worker
        self.heard_again = 0.0  # when it last heard from one again after that
        self.relinking: set[str] = set()  # apps restarting after a lost data link
        # (app, dead worker) of recoveries spawned and not finished yet
        self.recovering: Counter[tuple[str, str]] = Counter()
        self.started = time.monotonic()
        self.events: list[dict[str, Any]] = []  # recoveries and drains, for status and tests
        engine.on_begin = self.abandon_checkpoint
        engine.on_commit = self.checkpoint_soon
        engine.on_restart = self.events.append

    def start(self) -> None:
        self.spawn(self._checkpoint_loop(), name="checkpoints")
        self.spawn(self._monitor(), name="liveness")
        self.spawn(self._finish_inflight(), name="inflight")

    # ------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------
    async def _checkpoint_loop(self) -> None:
        if self.checkpoint_interval <= 0:
            return
        while True:
            await asyncio.sleep(self.checkpoint_interval)
            for name, st in list(self.engine.apps.items()):
                if st.state == "running" and not self.engine.busy(name):
                    await self.checkpoint(name)

    def abandon_checkpoint(self, app: str) -> None:
        """A transition begins: no checkpoint may cut across it, so the one in
        flight (if any) can no longer complete; its late reports are ignored."""
        p = self.pending.pop(app, None)
        if p is not None:
            log.debug("app %r: checkpoint %d abandoned: a transition begins", app, p.id)

    def checkpoint_soon(self, app: str) -> None:
        """Checkpoint ``app`` as soon as the transition that holds its lock ends
        (every commit is followed by a checkpoint of the new epoch at once)."""

        async def run() -> None:
            await self.engine.wait_idle(app)
            if self.engine.running(app) is not None:
                await self.checkpoint(app)

        self.spawn(run(), name=f"checkpoint-{app}")

    async def checkpoint(self, app: str, wait: bool = False) -> bool:
        """Start a checkpoint of ``app``; with ``wait``, return whether it completed.

        Not while a transition of the app is in flight (it would cut across it)."""
        store = self.engine.store
        assert store is not None
        if self.engine.busy(app):
            return False
        p = self.pending.get(app)
        # One at a time; one that cannot complete (a barrier lost with a worker) is
        # superseded after a few intervals, and instances drop its alignment.
        supersede = min(CHECKPOINT_TIMEOUT_S, max(1.0, 3 * self.checkpoint_interval))
        if p is not None and time.monotonic() - p.started < supersede:
            return False
        st = self.engine.apps[app]
        ms = self.ms
        hosts = {w for pl in st.placement.values() for w in pl.workers}
        absent = [w for w in sorted(hosts) if not (ms.alive(w) and ms.connected(w))]
        if absent:
            # Its barriers or reports could not all arrive (a master that just
            # restarted, a worker being declared dead): it would only block the next.
            log.debug("app %r: no checkpoint while %s is not connected", app, absent)
            return False
        stored = store.checkpoint(app)
        cid = max(self.last_checkpoint.get(app, 0), stored[0] if stored else 0) + 1
        self.last_checkpoint[app] = cid
        expected = {
            pl.instance(pe, i) for pe, pl in st.placement.items() for i in range(pl.parallelism)
        }
        p = self.pending[app] = PendingCheckpoint(cid, st.epoch, expected, time.monotonic())
        sources = {
            w
            for pe, pl in st.placement.items()
            if st.model.pe(pe).kind == "source"
            for w in pl.workers
        }
        await asyncio.gather(
            *(
                ms.send(w, pb.CHECKPOINT, app, cid, [], timeout=5)
                for w in sorted(sources)
                if ms.alive(w)
            ),
            return_exceptions=True,
        )
        if not wait:
            return True
        try:
            await asyncio.wait_for(p.done.wait(), CHECKPOINT_TIMEOUT_S)
        except TimeoutError:
            return False
        return True

    def on_report(self, rep: pb.CheckpointReport) -> None:
        p = self.pending.get(rep.app)
        if p is None or p.id != rep.checkpoint or rep.instance not in p.expected:
            return
        p.states[rep.instance] = bytes(rep.state)
        if len(p.states) < len(p.expected):
            return
        del self.pending[rep.app]
        st = self.engine.apps.get(rep.app)
        store = self.engine.store
        if st is not None and st.epoch == p.epoch and store is not None:
            stored = store.put_checkpoint(
                rep.app, p.id, p.epoch, msgpack.packb(p.states, use_bin_type=True)
            )
            workers = sorted({w for pl in st.placement.values() for w in pl.workers})
            self.spawn(self._committed(rep.app, p.id, stored, workers), name="committed")
            took = time.monotonic() - p.started
            self.engine.metrics.checkpoint_done(rep.app, took)
            log.debug("app %r: checkpoint %d complete in %.1f ms", rep.app, p.id, took * 1000)
        p.done.set()

    async def _committed(
        self, app: str, cid: int, stored: Future[None], workers: list[str]
    ) -> None:
        """Once checkpoint ``cid`` is durable, let the app's transactional sinks commit."""
        try:
            await asyncio.wrap_future(stored)
        except Exception:
            return  # not stored (logged by the store): nothing may commit
        ms = self.ms
        await asyncio.gather(
            *(ms.send(w, pb.COMMITTED, app, cid, [], timeout=5) for w in workers if ms.alive(w)),
            return_exceptions=True,
        )

    # ------------------------------------------------------------------
    # Liveness
    # ------------------------------------------------------------------
    def on_register(self, name: str) -> None:
        self.handled.discard(name)
        self.engine.draining.discard(name)

    def doomed(self) -> set[str]:
        """Apps that a pending recovery will restart whole: it waits for, or runs, the
        restart of an app that still places instances on the dead worker."""
        out: set[str] = set()
        for app, dead in self.recovering:
            st = self.engine.running(app)
            if st is not None:
                if any(dead in pl.workers for pl in st.placement.values()):
                    out.add(app)
        return out

    async def _monitor(self) -> None:
        ms = self.ms
        tick = min(0.25, ms.heartbeat_timeout / 4)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            late, last = now - last - tick, now
            if late > ms.heartbeat_timeout / 2:
                # The master itself did not run for a while (paused or starved): the
                # heartbeats that arrived meanwhile are not read yet. Read them first.
                log.warning(
                    "the master did not run for %.1f s; liveness is judged again after "
                    "the heartbeats that arrived meanwhile",
                    late,
                )
                continue
            dead = {n for n in ms.workers if not ms.alive(n)}
            # A worker whose heartbeats came back can die again later.
            self.handled -= {n for n in ms.workers if ms.alive(n)}
            if time.monotonic() - self.started > ms.heartbeat_timeout + 1:
                # Workers in a placement that never came back after a master restart.
                for st in self.engine.apps.values():
                    if st.state == "running":
                        dead |= {
                            w
                            for pl in st.placement.values()
                            for w in pl.workers
                            if w not in ms.workers
                        }
            new = dead - self.handled
            if new and not self._hears_a_worker(dead, now, tick):
                # Every worker went silent at once: the master's own network is the
                # likelier fault, and with no worker to restart on, declaring them dead
                # would only fence them and restart every app once they are heard again.
                if not self.deaf_since:
                    self.deaf_since = now
                    log.warning(
                        "the master hears from no worker (%s silent past the heartbeat "
                        "timeout); it declares none dead until it hears from one",
                        ", ".join(sorted(new)),
                    )
                continue
            if self.deaf_since:
                log.info("the master hears from workers again after %.1f s", now - self.deaf_since)
                self.deaf_since, self.heard_again = 0.0, now
            if new and now - self.heard_again <= ms.heartbeat_timeout:
                # The others' connections may take a while to come back (TCP backs off
                # while the network is down): each gets a full heartbeat timeout.
                continue
            for name in sorted(new):
                self.handled.add(name)
                w = ms.workers.get(name)
                if w is not None:
                    # Declared dead: its session is over. Whatever it sends under it is
                    # refused, and it stops what it runs before it may register again.
                    ms.fence(
                        name,
                        f"declared dead: no heartbeat for {now - w.last_seen:.1f} s, more "
                        f"than the heartbeat timeout of {ms.heartbeat_timeout:g} s",
                    )
                apps = [
                    a
                    for a, st in self.engine.apps.items()
                    if st.state == "running"
                    and any(name in pl.workers for pl in st.placement.values())
                ]
                if apps:
                    log.warning(
                        "worker %s is dead; restarting %s from checkpoints",
                        name,
                        ", ".join(repr(a) for a in apps),
                    )
                for app in apps:
                    self.recovering[(app, name)] += 1
                    self.spawn(self.recover(app, name), name=f"recover-{app}")

    def _hears_a_worker(self, dead: set[str], now: float, tick: float) -> bool:
        """Whether a worker not in ``dead`` sent a heartbeat lately (within two
        heartbeat intervals): then the silent ones are dead, not the master cut off."""
        recent = 2 * self.ms.heartbeat_interval + tick
        return any(now - w.last_seen <= recent for n, w in self.ms.workers.items() if n not in dead)

    def lost_apps(self, worker: str, running: list[pb.RunningInstance]) -> list[str]:
        """Running apps the placement puts on ``worker`` that it does not report
        running: it came back as a new process (a quick restart, before its old one
        was declared dead), so what it ran is gone."""
        have = {(r.app, r.instance) for r in running}
        lost = []
        for app, st in self.engine.apps.items():
            if st.state != "running":
                continue
            placed = {
                (app, pl.instance(pe, i))
                for pe, pl in st.placement.items()
                for i, w in enumerate(pl.workers)
                if w == worker
            }
            if placed - have:
                lost.append(app)
        return lost

    def recover_lost(self, worker: str, apps: list[str]) -> None:
        """Restart ``apps`` from their checkpoints: ``worker`` lost their instances."""
        for app in apps:
            log.warning(
                "worker %s came back without its instances of %r (the process restarted); "
                "restarting the app from its last checkpoint",
                worker,
                app,
            )
            self.recovering[(app, worker)] += 1
            self.spawn(
                self.recover(app, worker, f"worker {worker!r} restarted and lost its instances"),
                name=f"recover-{app}",
            )

    async def recover(self, app: str, dead: str, why: str = "") -> None:
        """Restart ``app`` from its last checkpoint on the live workers."""
        try:
            async with self.engine.hold(app, f"a recovery from the loss of worker {dead!r}"):
                st = self.engine.running(app)
                if st is None or not any(dead in pl.workers for pl in st.placement.values()):
                    return
                await self.engine.restart(app, why or f"worker {dead!r} is dead", dead)
        except Exception:
            log.exception("app %r: recovery from the loss of %s failed", app, dead)
            self.handled.discard(dead)
        finally:
            self.recovering[(app, dead)] -= 1
            if self.recovering[(app, dead)] <= 0:
                del self.recovering[(app, dead)]

    # ------------------------------------------------------------------
    # Lost data links: two live workers that cannot reach each other
    # ------------------------------------------------------------------
    def on_lost_links(self, worker: str, links: list[pb.LostLink]) -> None:
        """``worker``'s heartbeat reports data links down past its --link-timeout:
        restart each app that places instances on both ends from its last checkpoint,
        without the unreachable worker where the others have room. A peer that is
        dead is left to the dead-worker path."""
        for link in links:
            if not self.ms.alive(link.peer):
                continue
            for app in link.apps:
                st = self.engine.running(app)
                if st is None or app in self.relinking:
                    continue
                hosts = {w for pl in st.placement.values() for w in pl.workers}
                if worker in hosts and link.peer in hosts:
                    self.relinking.add(app)
                    self.spawn(self.relink(app, worker, link), name=f"relink-{app}")

    async def relink(self, app: str, worker: str, link: pb.LostLink) -> None:
        peer = link.peer
        why = (
            f"workers {worker!r} and {peer!r} could not reach each other for "
            f"{link.down_s:.1f} s ({link.error or 'no answer'})"
        )
        log.warning("app %r: %s; restarting it from its last checkpoint", app, why)
        try:
            async with self.engine.hold(app, f"a restart: {why}"):
                st = self.engine.running(app)
                hosts = {w for pl in st.placement.values() for w in pl.workers} if st else set()
                if st is None or not {worker, peer} <= hosts:
                    return  # restarted or moved meanwhile
                needed = sum(spec.parallelism for spec in st.model.pes)
                room = sum(n for w, n in self.engine.free_slots(app).items() if w != peer)
                avoid = {peer} if room >= needed else set()
                if not avoid:
                    log.warning(
                        "app %r: the workers other than %r have %d free slots of the %d it "
                        "needs; it restarts on all live workers",
                        app,
                        peer,
                        room,
                        needed,
                    )
                await self.engine.restart(app, why, peer, avoid=avoid)
        except Exception:
            log.exception("app %r: restart after the lost link to %s failed", app, peer)
        finally:
            self.relinking.discard(app)

    # ------------------------------------------------------------------
    # Drain
    # ------------------------------------------------------------------
    async def drain(self, worker: str) -> int:
        """Move every instance off ``worker`` with the upgrade protocol; return how many."""
        self.engine.draining.add(worker)
        moved = 0
        for app in list(self.engine.apps):
            st = self.engine.running(app)
            if st is None or not _pes_on(st, worker):
                continue
            async with self.engine.hold(app, f"moving instances off worker {worker!r}"):
                st = self.engine.running(app)
                pes = _pes_on(st, worker) if st is not None else ()
                if st is None or not pes:
                    continue  # killed or moved meanwhile
                t0 = time.perf_counter()
                await self.engine.move(app, pes)
                n = sum(st.placement[pe].workers.count(worker) for pe in pes)
                moved += n
                self.events.append(
                    {
                        "app": app,
                        "event": "drain",
                        "worker": worker,
                        "moved": n,
                        "ms": (time.perf_counter() - t0) * 1000,
                    }
                )
        return moved

    # ------------------------------------------------------------------
    # Transitions a crashed master left half done
    # ------------------------------------------------------------------
    async def _finish_inflight(self) -> None:
        ms = self.ms
        for it in await self.engine.interrupted():
            try:
                async with self.engine.hold(it.app, "finishing an interrupted upgrade"):
                    deadline = time.monotonic() + ms.heartbeat_timeout * 2
                    while time.monotonic() < deadline and not all(ms.alive(w) for w in it.workers):
                        await asyncio.sleep(0.1)
                    try:
                        await self.engine.finish(it)
                    except Refused as e:
                        if it.phase != "prepare":
                            raise
                        # Undoing it is what finishing an upgrade caught in prepare
                        # means: the engine answers so, as to the client it had.
                        log.warning(
                            "app %r: undid an upgrade interrupted in prepare (%s)", it.app, e
                        )
                    else:
                        log.warning(
                            "app %r: finished an upgrade interrupted in %s", it.app, it.phase
                        )
            except Exception:
                log.exception("app %r: could not finish the interrupted upgrade", it.app)


def _pes_on(st: Any, worker: str) -> tuple[str, ...]:
    """The PEs of ``st`` with an instance on ``worker``."""
    return tuple(sorted(pe for pe, pl in st.placement.items() if worker in pl.workers))
