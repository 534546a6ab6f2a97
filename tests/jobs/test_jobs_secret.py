"""The job's connection to its DL PE: only a process with the job's secret is served.

A connection that says hello without the secret (or with a wrong one, or says
nothing) is closed and counted; none of its messages becomes a result."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from jobs_helpers import poll_for

from hotwire.jobs import pe as pe_module
from hotwire.jobs.pe import DLJobPE
from hotwire.jobs.protocol import (
    SECRET_ENV,
    Channel,
    ConnectionClosed,
    connect,
    listen,
    new_secret,
    secret_matches,
)
from hotwire.sdk.pe import Context

# The program waits for a file before it serves, so the test's strangers reach
# the PE's socket first.
LATE = """
import os
import time
from pathlib import Path
from hotwire.jobs import serve

go = Path(os.environ["GO_FILE"])
while not go.exists():
    time.sleep(0.02)
serve(lambda r: {"in": r, "pid": os.getpid()})
"""


def ctx(request: dict, instance: int = 0) -> Context:
    return Context(
        app="app1", pe="scorer", instance=instance, parallelism=1, config={"request": request}
    )


@pytest.fixture
def pe(state_dir: Path):
    made = DLJobPE()
    yield made
    made.teardown()


def _stranger(address: str, hello: dict | None, then: list[dict]) -> None:
    """Connect as someone else; the PE must close the connection after the hello."""
    ch = Channel(connect(address))
    try:
        if hello is not None:
            ch.send(hello)
        for msg in then:
            try:
                ch.send(msg)
            except OSError:
                break  # already closed by the PE
        with pytest.raises((ConnectionClosed, ConnectionResetError)):
            for _ in range(100):  # any message would be a batch: there must be none
                assert ch.recv(timeout=0.2) is None
    finally:
        ch.close()


def test_strangers_are_refused_and_the_job_is_served(
    pe: DLJobPE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pe_module, "HELLO_TIMEOUT", 1.0)  # for the one that says nothing
    prog = tmp_path / "late.py"
    prog.write_text(LATE)
    go = tmp_path / "go"
    request = {"framework": "generic", "program": str(prog), "env": {"GO_FILE": str(go)}}
    errors: list[BaseException] = []

    def setup() -> None:
        try:
            pe.setup(ctx(request))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=setup)
    t.start()
    try:
        address = poll_for(lambda: getattr(pe, "_address", None))
        forged = {"t": "result", "seq": 1, "results": ["forged", "forged"]}
        hello = {"t": "hello", "rank": 0, "pid": 1}
        _stranger(address, None, [])  # connects and says nothing... then leaves
        _stranger(address, {"t": "batch", "seq": 1, "records": []}, [forged])  # no hello
        _stranger(address, hello, [forged])  # no secret
        _stranger(address, {**hello, "secret": ""}, [forged])  # an empty one
        _stranger(address, {**hello, "secret": "x" * 43}, [forged])  # a wrong one
        _stranger(address, {**hello, "secret": 12345}, [forged])  # not even text
        poll_for(lambda: pe.refused == 6)
    finally:
        go.touch()
        t.join(120)
    assert not errors, errors
    assert pe.job is not None and SECRET_ENV in pe.job.text
    got = pe.process_batch(["a", "b"])
    assert [g["in"] for g in got] == ["a", "b"]  # from the job, not a stranger
    assert pe.refused == 6


def test_each_job_gets_its_own_secret(state_dir: Path, tmp_path: Path) -> None:
    prog = tmp_path / "late.py"
    prog.write_text(LATE)
    (tmp_path / "go").touch()
    request = {
        "framework": "generic",
        "program": str(prog),
        "env": {"GO_FILE": str(tmp_path / "go")},
    }
    a, b = DLJobPE(), DLJobPE()
    try:
        a.setup(ctx(request, 0))
        b.setup(ctx(request, 1))
        assert a._secret and b._secret and a._secret != b._secret
        assert len(a._secret) >= 40  # 256 bits, URL-safe base64
        assert [r["in"] for r in a.process_batch([1])] == [1]
        assert [r["in"] for r in b.process_batch([2])] == [2]
        assert a.refused == b.refused == 0
    finally:
        a.teardown()
        b.teardown()


def test_secret_matches() -> None:
    hello = {"t": "hello", "rank": 0, "secret": "s3cret"}
    assert secret_matches(hello, "s3cret")
    assert not secret_matches(hello, "s3creT")
    assert not secret_matches({**hello, "t": "result"}, "s3cret")
    assert not secret_matches({**hello, "secret": b"s3cret"}, "s3cret")
    assert not secret_matches({"t": "hello", "rank": 0}, "s3cret")
    assert not secret_matches({**hello, "secret": ""}, "")  # no secret set: nobody gets in
    assert not secret_matches(None, "s3cret")


def test_a_tcp_listener_refuses_a_wrong_secret_too() -> None:
    """The Kubernetes path listens on TCP: the same check applies (here on loopback)."""
    pe = DLJobPE()
    pe._listener, pe._address = listen("tcp://127.0.0.1:0")
    pe._secret = new_secret()
    pe._check_alive = lambda: None  # type: ignore[method-assign]  # no backend here
    job: list[Channel] = []

    def connect_both() -> None:
        _stranger(pe._address, {"t": "hello", "rank": 0, "secret": new_secret()}, [])
        ch = Channel(connect(pe._address))
        ch.send({"t": "hello", "rank": 0, "secret": pe._secret})
        job.append(ch)

    t = threading.Thread(target=connect_both)
    t.start()
    try:
        pe._accept(timeout=30)
    finally:
        t.join(10)
        pe._listener.close()
    assert pe.refused == 1 and pe._chan is not None
    pe._chan.send({"t": "stop"})
    assert job[0].recv(timeout=5) == {"t": "stop"}  # the job's own connection is the one kept
    pe._chan.close()
    job[0].close()
