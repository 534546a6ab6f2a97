"""``streamctl jobs``: templates, images, render, submit, status, stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hotwire.jobs.cli import jobs


def run(*args: str):
    return CliRunner().invoke(jobs, list(args), catch_exceptions=False)


def test_templates_and_images_json() -> None:
    r = run("templates", "--json")
    assert r.exit_code == 0
    ids = {t["id"] for t in json.loads(r.stdout)["templates"]}
    assert {"pytorch-single", "pytorch-ddp", "tensorflow-ps", "generic"} <= ids
    r = run("images", "--json")
    images = {i["id"]: i for i in json.loads(r.stdout)["images"]}
    assert images["pytorch-2.13-cpu"]["backends"]["local"] == {"python": "current"}
    human = run("templates").stdout
    assert human.splitlines()[0].split()[:3] == ["ID", "FRAMEWORK", "MODE"]


def test_render_prints_the_job_description_file(tmp_path: Path) -> None:
    req = tmp_path / "req.yaml"
    req.write_text(
        "name: ddp\nframework: pytorch\nmode: ddp\nreplicas: 2\nprogram: image:/app/train.py\n"
    )
    r = run("render", str(req), "--backend", "kubernetes", "--validate")
    assert r.exit_code == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    assert [d["kind"] for d in docs] == ["Service", "Job"]


def test_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    req = tmp_path / "bad.yaml"
    req.write_text("name: BAD\nframework: pytorch\nreplicas: 0\n")
    r = run("render", str(req))
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {req} has 3 bad fields: name: ")
    req.write_text("name: x\nframework: pytorch\nversion: '9'\ncommand: [x]\n")
    r = run("render", str(req))
    assert r.exit_code == 1 and "no image for framework 'pytorch' version '9'" in r.stderr


def test_usage_errors_exit_2() -> None:
    assert run("render").exit_code == 2
    assert run("render", "x.yaml", "--backend", "slurm").exit_code == 2


def test_submit_status_stop_on_the_local_backend(state_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "loop.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    (tmp_path / "ok.py").write_text("print('done')\n")
    (tmp_path / "loop.yaml").write_text("name: loop\nframework: generic\nprogram: loop.py\n")
    (tmp_path / "ok.yaml").write_text("name: ok\nframework: generic\nprogram: ok.py\n")
    r = run("submit", str(tmp_path / "ok.yaml"), "--wait", "30", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["state"] == "succeeded" and doc["template"] == "generic"
    r = run("submit", str(tmp_path / "loop.yaml"))
    assert r.stdout.startswith("job loop (generic, python-3.11) on local: ")
    st = json.loads(run("status", "loop", "--json").stdout)
    assert st["state"] == "running" and st["replicas"][0]["name"] == "loop-0"
    every = json.loads(run("status", "--json").stdout)
    assert sorted(j["name"] for j in every["jobs"]) == ["loop", "ok"]
    assert "done" in run("logs", "ok").stdout
    r = run("stop", "loop", "--json")
    assert json.loads(r.stdout)["state"] == "stopped"
    r = run("status", "nope")
    assert r.exit_code == 1 and r.stderr.startswith("error: no local job 'nope'")


def test_streamctl_has_the_jobs_group() -> None:
    main = pytest.importorskip("hotwire.cli").main
    r = CliRunner().invoke(main, ["jobs", "templates", "--json"], catch_exceptions=False)
    assert r.exit_code == 0 and json.loads(r.stdout)["templates"]
