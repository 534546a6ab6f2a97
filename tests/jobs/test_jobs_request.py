"""Job requests: parsing and validation that names every bad field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hotwire.jobs import JobRequest, RequestError, load_request, parse_request
from hotwire.jobs.request import cpu_quantity, memory_quantity, parse_cpu, parse_memory

GOOD = {
    "name": "scorer",
    "framework": "pytorch",
    "version": "2.13",
    "mode": "ddp",
    "replicas": 2,
    "resources": {"cpu": "500m", "memory": "1Gi", "gpu": 0},
    "command": ["python", "x.py"],
    "args": ["--epochs", 3],
    "env": {"A": "1", "B": 2},
    "program": "/tmp/x.py",
    "data": "/tmp/data",
}


def test_a_good_request_parses_and_round_trips() -> None:
    r = parse_request(GOOD)
    assert r.name == "scorer" and r.mode == "ddp" and r.replicas == 2
    assert r.resources.cpu == 0.5 and r.resources.memory == 2**30
    assert r.args == ("--epochs", "3")
    assert r.env_dict == {"A": "1", "B": "2"}
    assert r.accelerator == "cpu"
    assert parse_request(r.to_dict()) == r


def test_every_bad_field_is_named_at_once() -> None:
    bad = {
        "name": "Bad_Name",
        "framework": "",
        "replicas": 0,
        "procs_per_replica": "two",
        "resources": {"cpu": "lots", "memory": "-1", "gpu": -1, "disk": 3},
        "env": {"1X": "a", "OK": {"nested": 1}},
        "backend": "slurm",
        "timeout": -5,
        "replica": 2,
        "args": {"a": 1},
    }
    with pytest.raises(RequestError) as ei:
        parse_request(bad)
    fields = {f for f, _ in ei.value.problems}
    assert fields == {
        "name",
        "framework",
        "replicas",
        "procs_per_replica",
        "resources.cpu",
        "resources.memory",
        "resources.gpu",
        "resources.disk",
        "env.1X",
        "env.OK",
        "backend",
        "timeout",
        "replica",
        "args",
        "program",
    }
    msg = str(ei.value)
    assert msg.startswith("job request has 15 bad fields: ")
    assert "replica: unknown field" in msg


def test_gpu_resources_select_the_gpu_accelerator_and_contradictions_are_errors() -> None:
    r = parse_request({**GOOD, "resources": {"gpu": 2}})
    assert r.accelerator == "gpu" and r.resources.gpu == 2
    with pytest.raises(RequestError, match=re.escape("accelerator: is 'cpu' but resources.gpu")):
        parse_request({**GOOD, "accelerator": "cpu", "resources": {"gpu": 1}})


def test_a_request_needs_a_program_or_a_command() -> None:
    with pytest.raises(RequestError, match="program: give program"):
        parse_request({"name": "x", "framework": "pytorch"})


def test_not_a_mapping() -> None:
    with pytest.raises(RequestError, match=r"\(request\): must be a mapping"):
        parse_request(["name", "x"])


def test_load_request_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("name: t\nframework: pytorch\nprogram: train.py\n")
    r = load_request(tmp_path / "job.yaml")
    assert isinstance(r, JobRequest)
    assert r.program == str(tmp_path / "train.py")
    (tmp_path / "job.json").write_text('{"name": "t", "framework": "pytorch", "command": "ls"}')
    assert load_request(tmp_path / "job.json").command == ("ls",)


def test_load_request_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(RequestError, match=re.escape(f"{p} has 1 bad field: (file): is not valid")):
        load_request(p)
    with pytest.raises(RequestError, match="cannot read"):
        load_request(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("text", "cores"), [("2", 2.0), ("500m", 0.5), (1.5, 1.5), (3, 3.0)])
def test_cpu_quantities(text: object, cores: float) -> None:
    assert parse_cpu(text) == cores
    assert parse_cpu(cpu_quantity(cores)) == cores


@pytest.mark.parametrize(("text", "n"), [("512Mi", 512 * 2**20), ("2G", 2 * 10**9), (1024, 1024)])
def test_memory_quantities(text: object, n: int) -> None:
    assert parse_memory(text) == n
    assert parse_memory(memory_quantity(n)) == n
