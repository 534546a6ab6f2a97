"""The DL PE: records go to a job's program over a socket and results come back."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from jobs_helpers import processes_mentioning

from hotwire.jobs import JobError
from hotwire.jobs.pe import DLJobPE
from hotwire.jobs.serve import serve
from hotwire.sdk.pe import Context, ProcessPE

ECHO = """
import os
from hotwire.jobs import serve

tag = os.environ.get("TAG", "")

def handle(r):
    if r == "boom":
        raise ValueError("no booms please")
    if r == "unsendable":
        return object()
    return {"in": r, "tag": tag, "pid": os.getpid()}

serve(handle)
"""


def ctx(request: dict, pe: str = "scorer", instance: int = 0, **config: object) -> Context:
    return Context(
        app="app1", pe=pe, instance=instance, parallelism=1, config={"request": request, **config}
    )


def echo_request(tmp_path: Path, **kw: object) -> dict:
    prog = tmp_path / "echo.py"
    prog.write_text(ECHO)
    return {"framework": "generic", "program": str(prog), **kw}


@pytest.fixture
def pes(state_dir: Path):
    made: list[DLJobPE] = []

    def make() -> DLJobPE:
        pe = DLJobPE()
        made.append(pe)
        return pe

    yield make
    for pe in made:
        pe.teardown()


def test_dl_job_pe_is_a_batched_process_pe() -> None:
    assert issubclass(DLJobPE, ProcessPE) and DLJobPE.batched()


def test_every_record_comes_back_exactly_once_in_order(pes, tmp_path: Path) -> None:
    pe = pes()
    pe.setup(ctx(echo_request(tmp_path, env={"TAG": "v1"})))
    sent, got = [], []
    for b in range(30):
        batch = [{"n": b * 100 + i} for i in range(b % 7)]  # includes empty batches
        sent += batch
        got += pe.process_batch(batch)
    assert [g["in"] for g in got] == sent
    assert {g["tag"] for g in got} == {"v1"}
    assert list(pe.process({"n": -1})) == [{"in": {"n": -1}, "tag": "v1", "pid": got[0]["pid"]}]


def test_a_handler_exception_fails_that_batch_only(pes, tmp_path: Path) -> None:
    pe = pes()
    pe.setup(ctx(echo_request(tmp_path)))
    with pytest.raises(
        JobError,
        match=r"dl_job PE 'scorer' \(app 'app1', instance 0\): the "
        r"job's handler failed on a batch of 2 records: "
        r"ValueError: no booms please",
    ):
        pe.process_batch(["ok", "boom"])
    with pytest.raises(JobError, match="TypeError: can not serialize 'object' object"):
        pe.process_batch(["unsendable"])
    assert [r["in"] for r in pe.process_batch(["a", "b"])] == ["a", "b"]


def test_teardown_stops_the_job(pes, tmp_path: Path) -> None:
    pe = pes()
    pe.setup(ctx(echo_request(tmp_path)))
    assert processes_mentioning(str(tmp_path / "echo.py"))
    pe.teardown()
    assert not processes_mentioning(str(tmp_path / "echo.py"))
    with pytest.raises(JobError, match="not set up"):
        pe.process_batch([1])
    pe.teardown()  # idempotent


def test_a_job_that_never_serves_fails_setup_with_its_output(pes, tmp_path: Path) -> None:
    prog = tmp_path / "crash.py"
    prog.write_text("import sys\nprint('loading model failed', flush=True)\nsys.exit(2)\n")
    pe = pes()
    with pytest.raises(
        JobError,
        match=r"the job ended before it served; job scorer-[0-9a-f]{8} "
        r"is failed: .*last output: .*loading model failed",
    ):
        pe.setup(ctx({"framework": "generic", "program": str(prog)}))
    assert not processes_mentioning(str(tmp_path))


def test_a_job_that_dies_mid_stream_is_reported(pes, tmp_path: Path) -> None:
    prog = tmp_path / "dies.py"
    prog.write_text(
        "import os\nfrom hotwire.jobs import serve\n"
        "def h(r):\n    if r == 'die':\n        os._exit(9)\n    return r\nserve(h)\n"
    )
    pe = pes()
    pe.setup(ctx({"framework": "generic", "program": str(prog)}))
    assert pe.process_batch([1]) == [1]
    with pytest.raises(JobError, match=r"closed the connection mid-batch; job .* is failed"):
        pe.process_batch(["die"])


def test_bad_requests_fail_setup_naming_the_pe(pes) -> None:
    with pytest.raises(
        JobError,
        match=r"request of dl_job PE 'scorer' .* has 1 bad field: "
        r"replicas: must be an integer >= 1",
    ):
        pes().setup(ctx({"framework": "generic", "command": ["x"], "replicas": 0}))
    with pytest.raises(JobError, match="config has no 'request'"):
        pes().setup(Context(app="a", pe="p", config={}))


def test_parallel_instances_run_separate_jobs(pes, tmp_path: Path) -> None:
    a, b = pes(), pes()
    req = echo_request(tmp_path)
    a.setup(ctx(req, instance=0))
    b.setup(ctx(req, instance=1))
    assert a.request.name != b.request.name
    ra, rb = a.process_batch([1, 2]), b.process_batch([3])
    assert [r["in"] for r in ra] == [1, 2] and [r["in"] for r in rb] == [3]
    assert ra[0]["pid"] != rb[0]["pid"]


def test_upgrade_starts_the_new_job_switches_then_stops_the_old(pes, tmp_path: Path) -> None:
    """What the runtime does on an upgrade: prepare the new instance, switch, retire the old."""
    old = pes()
    old.setup(ctx(echo_request(tmp_path, env={"TAG": "v1"})))
    assert {r["tag"] for r in old.process_batch([1, 2])} == {"v1"}
    # prepare: another template and image; the old job keeps serving meanwhile
    new = pes()
    new.setup(
        ctx(echo_request(tmp_path, env={"TAG": "v2"}, template="generic", image="python-3.11"))
    )
    assert {r["tag"] for r in old.process_batch([3])} == {"v1"}
    # switch, then retire the old instance
    assert {r["tag"] for r in new.process_batch([4, 5])} == {"v2"}
    old_pid = old.process_batch([0])[0]["pid"]
    old.teardown()
    assert not [p for p, _ in processes_mentioning(str(tmp_path / "echo.py")) if p == old_pid]
    assert [r["in"] for r in new.process_batch([6])] == [6]


def test_serve_without_an_address_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTWIRE_JOBS_ADDRESS", raising=False)
    with pytest.raises(
        RuntimeError, match="needs HOTWIRE_JOBS_ADDRESS: run this program as a dl_job"
    ):
        serve(lambda r: r)


def test_serve_in_batch_mode_checks_the_result_count(tmp_path: Path) -> None:
    from hotwire.jobs.protocol import Channel, listen

    lst, addr = listen(f"unix:{tmp_path}/s.sock")
    calls = []

    def handler(batch):
        calls.append(len(batch))
        return batch[:-1] if batch == ["short", "x"] else [x * 2 for x in batch]

    t = threading.Thread(target=serve, args=(handler,), kwargs={"batch": True, "address": addr})
    t.start()
    conn, _ = lst.accept()
    ch = Channel(conn)
    try:
        assert ch.recv(5)["t"] == "hello"
        ch.send({"t": "batch", "seq": 1, "records": [1, 2]})
        assert ch.recv(5) == {"t": "result", "seq": 1, "results": [2, 4]}
        ch.send({"t": "batch", "seq": 2, "records": ["short", "x"]})
        err = ch.recv(5)
        assert err["t"] == "error" and "returned 1 results for 2 records" in err["error"]
        ch.send({"t": "stop"})
    finally:
        t.join(10)
        ch.close()
        lst.close()
    assert not t.is_alive() and calls == [2, 2]


def test_a_pytorch_model_scores_records_through_the_pe(pes, torch_examples: Path) -> None:
    pe = pes()
    pe.setup(
        ctx(
            {
                "name": "scorer",
                "framework": "pytorch",
                "version": "2.13",
                "program": str(torch_examples / "score_model.py"),
            }
        )
    )
    assert pe.job.template.id == "pytorch-single" and pe.job.image.id == "pytorch-2.13-cpu"
    records = [{"id": i, "features": [i / 10, 1.0, -1.0, 0.5]} for i in range(50)]
    out = pe.process_batch(records[:20]) + pe.process_batch(records[20:])
    assert [o["id"] for o in out] == list(range(50))
    assert all(0.0 < o["score"] < 1.0 for o in out)
    # deterministic model: the same record scores the same
    assert pe.process_batch([records[7]]) == [out[7]]
