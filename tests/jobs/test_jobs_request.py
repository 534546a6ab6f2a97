"""Job requests: parsing and validation that names every bad field."""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hotwire.cli import main
from hotwire.jobs import JobRequest, RequestError, load_request, parse_request
from hotwire.jobs.catalog import Catalog
from hotwire.jobs.request import (
    CatalogNames,
    cpu_quantity,
    memory_quantity,
    parse_cpu,
    parse_memory,
)

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


# -- every bad field at once, catalog names included ---------------------------------------


def _names() -> CatalogNames:
    cat = Catalog.load(use_env=False)
    return CatalogNames.of(cat.templates.values(), cat.images.values())


OK = {"name": "train", "framework": "pytorch", "command": ["python", "train.py"]}


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        # the case that used to report only replicas: the framework came later, alone
        ({"framework": "pytorchh", "replicas": -2}, {"framework", "replicas"}),
        ({"framework": "tensorflow", "mode": "ddp", "replicas": "2"}, {"mode", "replicas"}),
        # tensorflow has only mode ps, so the default mode (single) is named too
        ({"framework": "tensorflow", "timeout": float("nan")}, {"mode", "timeout"}),
        (
            {"template": "nope", "image": "gone", "procs_per_replica": 0, "replica": 2},
            {"template", "image", "procs_per_replica", "replica"},
        ),
        (
            {"name": 7, "framework": 3, "env": {"WHEN": datetime.date(2024, 1, 1)}},
            {"name", "framework", "env.WHEN"},
        ),
        (
            {"resources": {"cpu": "lots", "gpu": 1.5}, "command": [""], "accelerator": "tpu"},
            {"resources.cpu", "resources.gpu", "command", "accelerator"},
        ),
    ],
)
def test_catalog_names_and_field_errors_are_named_together(
    changes: dict[str, object], fields: set[str]
) -> None:
    with pytest.raises(RequestError) as ei:
        parse_request({**OK, **changes}, names=_names())
    assert {f for f, _ in ei.value.problems} == fields
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"job request has {len(fields)} bad fields: ")
    for f in fields:
        assert f"{f}: " in msg


def test_catalog_names_messages_say_what_there_is() -> None:
    with pytest.raises(RequestError) as ei:
        parse_request({**OK, "framework": "pytorchh", "image": "gone"}, names=_names())
    problems = dict(ei.value.problems)
    assert problems["framework"].startswith(
        "unknown framework 'pytorchh'; the catalogs have generic, pytorch, tensorflow"
    )
    assert "pytorch-2.13-cpu" in problems["image"]
    with pytest.raises(RequestError, match=re.escape("mode: framework 'tensorflow' has no mode")):
        parse_request({**OK, "framework": "tensorflow"}, names=_names())


def test_good_requests_pass_the_catalog_check() -> None:
    names = _names()
    assert parse_request(GOOD, names=names).mode == "ddp"
    assert parse_request({**OK, "framework": "tensorflow", "mode": "ps"}, names=names)
    # explicit template and image: the framework is not used for selection
    explicit = {**OK, "framework": "mine", "template": "generic", "image": "python-3.11"}
    assert parse_request(explicit, names=names).template == "generic"
    # without names, only the fields themselves are checked (as the DL PE does)
    assert parse_request({**OK, "framework": "pytorchh"}).framework == "pytorchh"


BAD_FILES = [
    ("name: x\nframework: pytorchh\nreplicas: -2\ncommand: [ls]\n", ["framework", "replicas"]),
    (
        "name: Bad_Name\nframework: tensorflow\nmode: ddp\nreplicas: two\ntimeout: -1\n"
        "resources: {memory: lots}\nenv: {D: 2024-01-01}\nreplica: 2\n",
        ["name", "mode", "replicas", "timeout", "resources.memory", "env.D", "replica", "program"],
    ),
    (
        "name: x\nframework: pytorch\nimage: gone\ntemplate: nope\nargs: {a: 1}\nprogram: t.py\n",
        ["image", "template", "args"],
    ),
]


@pytest.mark.parametrize(("text", "fields"), BAD_FILES)
@pytest.mark.parametrize("command", ["render", "submit"])
def test_streamctl_jobs_names_every_bad_field_in_one_line(
    state_dir: Path, tmp_path: Path, command: str, text: str, fields: list[str]
) -> None:
    req = tmp_path / "job.yaml"
    req.write_text(text)
    r = CliRunner().invoke(main, ["jobs", command, str(req)])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    n = len(fields)
    assert r.stderr.startswith(f"error: {req} has {n} bad field{'s' if n > 1 else ''}: ")
    for f in fields:
        assert f" {f}: " in r.stderr, (f, r.stderr)
    assert not state_dir.exists() or not any(state_dir.iterdir())  # nothing was started


def test_the_real_streamctl_names_every_bad_field(state_dir: Path, tmp_path: Path) -> None:
    req = tmp_path / "job.yaml"
    req.write_text(BAD_FILES[0][0])
    r = subprocess.run(
        [sys.executable, "-m", "hotwire.cli", "jobs", "submit", str(req)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: {req} has 2 bad fields: replicas: must be an integer >= 1, got -2; "
        "framework: unknown framework 'pytorchh'; the catalogs have generic, pytorch, "
        "tensorflow (or add one with --catalog DIR)"
    ]
