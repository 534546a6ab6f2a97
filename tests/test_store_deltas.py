"""A version's model is stored as what changed since the version before, and every
read (a version, the history, a restarted master's apps, a stored intent) rebuilds
it whole. The engine runs with a real store over an in-process instruction stream
(tests/test_transition_engine.py's ``Stream``); the same paths on real processes
are tests/test_upgrade.py and tests/test_failures.py (a master killed mid-upgrade).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from test_transition_engine import Stream, quick

from hotwire.master.engine import MODEL_SNAPSHOT_EVERY, TransitionEngine
from hotwire.master.store import Store
from hotwire.model import LogicalModel, PESpec, StreamSpec
from hotwire.model_delta import model_delta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from workload import wide_model

PES = 200


def versions_of_the_app() -> list[LogicalModel]:
    """Version 1, then one changed PE per version, then a PE added, then removed."""
    models = [wide_model(PES, name="app", version=v) for v in range(MODEL_SNAPSHOT_EVERY + 4)]
    last = models[-1]
    extra = PESpec("extra", "sink", 1, "fp-extra", "drop")
    added = LogicalModel.build(
        "app", [*last.pes, extra], [*last.streams, StreamSpec("m0_0", "extra")]
    )
    return [*models, added, last]


async def change(engine: TransitionEngine, version: int, new: LogicalModel) -> None:
    cur = engine.apps.get("app")
    old = cur.model if cur is not None else LogicalModel.build("app", [], [])
    async with engine.claim("app", "a test"):
        o = await engine.change(
            "app",
            version,
            "submit" if cur is None else "upgrade",
            old,
            cur.placement if cur is not None else {},
            new,
            b"bundle",
            "hash",
        )
    assert o.applied


def run(body: Any) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "hotwire.db"
            store = await asyncio.to_thread(Store, path)
            try:
                stream = Stream(["w1", "w2"], lambda w, p, n: "ok")
                for w in stream.workers.values():
                    w.slots = PES
                engine = quick(TransitionEngine(stream))  # type: ignore[arg-type]
                await engine.load(store)
                await body(engine, store, stream, path)
            finally:
                await asyncio.to_thread(store.close)

    asyncio.run(main())


def test_versions_are_stored_as_deltas_and_read_back_whole() -> None:
    models = versions_of_the_app()

    async def body(engine: TransitionEngine, store: Store, stream: Stream, path: Path) -> None:
        for v, m in enumerate(models, start=1):
            await change(engine, v, m)
        await store.flush()
        with sqlite3.connect(path) as db:
            rows = dict(db.execute("SELECT version, model_json FROM versions WHERE app = 'app'"))
        whole = len(models[0].to_json())
        for v, text in rows.items():
            d = json.loads(text)
            if v == 1 or v % MODEL_SNAPSHOT_EVERY == 0:
                assert "delta_of" not in d, f"version {v} is stored whole"
            else:
                assert d["delta_of"] == v - 1, f"version {v} is a delta on the one before"
                assert len(text) < whole / 20, f"version {v}: {len(text)} of {whole} bytes"
        # Every read rebuilds the whole model, in PE and stream order.
        history = await store.read(store.versions, "app")
        assert [r.version for r in history] == list(range(1, len(models) + 1))
        for r, m in zip(history, models, strict=True):
            assert r.model.to_json() == m.to_json(), f"history, version {r.version}"
        for v, m in enumerate(models, start=1):
            rec = await store.read(store.version, "app", v)
            assert rec is not None and rec.model.to_json() == m.to_json(), f"version {v}"
        # A master started on the same store takes the last version whole.
        again = quick(TransitionEngine(stream))  # type: ignore[arg-type]
        await again.load(store)
        assert again.apps["app"].model == models[-1]
        assert again.apps["app"].version == len(models)
        # An upgrade from there (back to version 1's model, as a rollback does).
        await change(again, len(models) + 1, models[0])
        rec = await store.read(store.version, "app", len(models) + 1)
        assert rec is not None and rec.model == models[0]

    run(body)


def test_a_stored_intents_delta_is_rebuilt_from_memory_or_from_the_store() -> None:
    m1, m2, m3 = (wide_model(PES, name="app", version=v) for v in range(3))

    async def body(engine: TransitionEngine, store: Store, stream: Stream, path: Path) -> None:
        await change(engine, 1, m1)
        await change(engine, 2, m2)
        # what an upgrade to version 3 records in its intent: a delta on version 2
        text = engine._model_text("app", 3, engine.apps["app"].model, m3)
        assert json.loads(text)["delta_of"] == 2
        restarted = quick(TransitionEngine(stream))  # type: ignore[arg-type]
        await restarted.load(store)
        assert restarted._intent_model({"model": text, "version": 3}) == m3
        # a delta on a version other than the app's current one is read from the store
        d = model_delta(m1, m3)
        assert d is not None
        on_v1 = json.dumps({"delta_of": 1, **d})
        built = await asyncio.to_thread(restarted._intent_model, {"model": on_v1, "version": 3})
        assert built == m3

    run(body)
