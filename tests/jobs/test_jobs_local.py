"""The local backend runs real processes: generic jobs, a PyTorch job and a DDP job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from jobs_helpers import poll_for, processes_mentioning

from hotwire.jobs import Catalog, JobNotFound, load_request, parse_request, render
from hotwire.jobs.backends import BackendError, get_backend
from hotwire.jobs.backends.local import LocalBackend


def generic(tmp_path: Path, name: str, code: str, **kw: object):
    prog = tmp_path / f"{name}.py"
    prog.write_text(code)
    return parse_request({"name": name, "framework": "generic", "program": str(prog), **kw})


def submit(local: LocalBackend, request) -> str:
    job = render(request, Catalog.load(use_env=False), "local")
    local.submit(job)
    return job.name


def test_replicas_run_with_their_index_env_and_working_directory(
    local: LocalBackend, tmp_path: Path
) -> None:
    code = (
        "import os, sys\nprint('replica', os.environ['HOTWIRE_REPLICA'], 'of',"
        " os.environ['HOTWIRE_REPLICAS'], os.environ['GREETING'], os.getcwd(), sys.argv[1:])\n"
    )
    name = submit(
        local, generic(tmp_path, "hello", code, replicas=3, args=["a", "b"], env={"GREETING": "hi"})
    )
    st = local.wait(name, 30)
    assert st.state == "succeeded", local.logs(name)
    assert [(r.name, r.state, r.exit_code) for r in st.replicas] == [
        ("hello-0", "succeeded", 0),
        ("hello-1", "succeeded", 0),
        ("hello-2", "succeeded", 0),
    ]
    logs = local.logs(name)
    for i in range(3):
        assert f"replica {i} of 3 hi {tmp_path} ['a', 'b']" in logs[f"hello-{i}"]
    assert [s.name for s in local.list()] == ["hello"]


def test_a_failing_replica_fails_the_job_and_stops_the_others(
    local: LocalBackend, tmp_path: Path
) -> None:
    code = (
        "import os, sys, time\nif os.environ['HOTWIRE_REPLICA'] == '1':\n"
        "    sys.exit(3)\ntime.sleep(60)\n"
    )
    name = submit(local, generic(tmp_path, "fails", code, replicas=2))
    st = local.wait(name, 30)
    assert st.state == "failed"
    assert st.message == "replica fails-1 failed"
    assert [(r.state, r.exit_code) for r in st.replicas] == [("stopped", -15), ("failed", 3)]


def test_stop_ends_every_replica(local: LocalBackend, tmp_path: Path) -> None:
    name = submit(local, generic(tmp_path, "sleeper", "import time\ntime.sleep(120)\n", replicas=2))
    poll_for(lambda: len(processes_mentioning(str(tmp_path / "sleeper.py"))) == 2)
    assert local.status(name).state == "running"
    st = local.stop(name)
    assert st.state == "stopped" and st.message == "stopped on request"
    assert processes_mentioning(str(tmp_path / "sleeper.py")) == []
    assert local.stop(name).state == "stopped"  # idempotent


def test_a_killed_supervisor_takes_its_replicas_along(local: LocalBackend, tmp_path: Path) -> None:
    import os
    import signal

    name = submit(local, generic(tmp_path, "orphan", "import time\ntime.sleep(120)\n"))
    poll_for(lambda: processes_mentioning(str(tmp_path / "orphan.py")))
    pid = int((local.state_dir / name / "supervisor.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    poll_for(lambda: not processes_mentioning(str(tmp_path / "orphan.py")))
    st = local.status(name)
    assert st.state == "failed" and "supervisor process is gone" in st.message


def test_timeout_is_a_deadline(local: LocalBackend, tmp_path: Path) -> None:
    name = submit(local, generic(tmp_path, "slow", "import time\ntime.sleep(60)\n", timeout=1))
    st = local.wait(name, 20)
    assert st.state == "failed" and st.message.startswith("DeadlineExceeded")


def test_memory_limit_is_enforced(local: LocalBackend, tmp_path: Path) -> None:
    code = "x = bytearray(400 * 2**20)\nprint('allocated')\n"
    name = submit(local, generic(tmp_path, "hog", code, resources={"memory": "128Mi"}))
    st = local.wait(name, 30)
    assert st.state == "failed", local.logs(name)
    assert st.extra["limits"]["hog-0"] in ("cgroup-v1", "cgroup-v2") or st.extra["limits"][
        "hog-0"
    ].startswith("rlimit-as")
    assert "allocated" not in local.logs(name)["hog-0"]


def test_cpu_limit_pins_the_replica(local: LocalBackend, tmp_path: Path) -> None:
    code = "import os\nprint(len(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])\n"
    name = submit(local, generic(tmp_path, "pinned", code, resources={"cpu": "500m"}))
    assert local.wait(name, 30).state == "succeeded"
    assert local.logs(name)["pinned-0"].strip() == "1 1"


def test_a_command_that_cannot_start_fails_the_job(local: LocalBackend) -> None:
    r = parse_request(
        {"name": "nocmd", "framework": "generic", "command": ["/nonexistent/binary"], "replicas": 2}
    )
    name = submit(local, r)
    st = local.wait(name, 20)
    assert st.state == "failed" and "could not start" in st.message


def test_running_job_cannot_be_submitted_twice_and_unknown_jobs(
    local: LocalBackend, tmp_path: Path
) -> None:
    r = generic(tmp_path, "twice", "import time\ntime.sleep(60)\n")
    submit(local, r)
    with pytest.raises(BackendError, match="already running; stop it first"):
        submit(local, r)
    local.stop("twice")
    with pytest.raises(JobNotFound, match="no local job 'nope'"):
        local.status("nope")
    local.delete("twice")
    assert local.list() == []


def test_get_backend_says_plainly_when_a_backend_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hotwire.jobs import BackendUnavailable

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(
        BackendUnavailable,
        match="backend 'podman' is not available on this machine: podman is not installed",
    ):
        get_backend("podman")
    with pytest.raises(BackendUnavailable, match="unknown backend 'slurm'"):
        get_backend("slurm")
    assert isinstance(get_backend(), LocalBackend)


# -- real PyTorch ------------------------------------------------------------------------


def test_local_backend_runs_a_pytorch_training_job(
    local: LocalBackend, torch_examples: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = load_request(torch_examples / "train_single.yaml").replace(data=str(out))
    name = submit(local, r)
    st = local.wait(name, 90)
    assert st.state == "succeeded", local.logs(name)
    result = json.loads((out / "single.json").read_text())
    assert result["w"] == pytest.approx(3.0, abs=0.01) and result["b"] == pytest.approx(
        1.0, abs=0.01
    )


def test_local_backend_runs_a_two_replica_ddp_job(
    local: LocalBackend, torch_examples: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = load_request(torch_examples / "train_ddp.yaml").replace(data=str(out))
    assert (r.mode, r.replicas) == ("ddp", 2)
    name = submit(local, r)
    st = local.wait(name, 120)
    logs = local.logs(name)
    assert st.state == "succeeded", logs
    assert "rank 0/2" in logs["train-ddp-0"] and "rank 1/2" in logs["train-ddp-1"]
    result = json.loads((out / "ddp.json").read_text())
    assert result["world_size"] == 2 and result["in_sync"] is True
    assert result["w"] == pytest.approx(3.0, abs=0.01)


def test_supervisor_runs_without_hotwire_importable(tmp_path: Path) -> None:
    """The supervisor is a plain script: it needs only the standard library."""
    import subprocess

    from hotwire.jobs.backends.local import SUPERVISOR

    d = tmp_path / "job"
    d.mkdir()
    (d / "replicas.json").write_text(
        json.dumps(
            {
                "replicas": [
                    {"pod": "p-0", "command": [sys.executable, "-c", "print('ok')"], "env": {}}
                ]
            }
        )
    )
    subprocess.run([sys.executable, "-S", "-I", str(SUPERVISOR), str(d)], check=True, timeout=30)
    assert json.loads((d / "status.json").read_text())["state"] == "succeeded"
