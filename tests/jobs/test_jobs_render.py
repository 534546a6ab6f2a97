"""Rendering: job-description files the Kubernetes schema and client models accept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from hotwire.jobs import Catalog, RenderError, parse_request, render
from hotwire.jobs.k8s import KUBERNETES_VERSION, to_models, validate_schema
from hotwire.jobs.podspec import expand_refs, replicas_of

pytest.importorskip("kubernetes_validate")
pytest.importorskip("kubernetes")


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return Catalog.load(use_env=False)


def req(**kw: object):
    base = {
        "name": "job",
        "framework": "pytorch",
        "program": "/opt/app/train.py",
        "args": ["--lr", "0.1"],
        "env": {"EXTRA": "yes"},
    }
    return parse_request({**base, **kw})


REQUESTS = {
    "pytorch-single": {},
    "pytorch-single-gpu": {"resources": {"gpu": 2, "cpu": 4, "memory": "8Gi"}, "timeout": 600},
    "pytorch-ddp": {
        "mode": "ddp",
        "replicas": 3,
        "procs_per_replica": 2,
        "resources": {"cpu": "1500m", "memory": "2Gi"},
    },
    "pytorch-ddp-gpu": {"mode": "ddp", "replicas": 2, "resources": {"gpu": 1}},
    "tensorflow-ps": {"framework": "tensorflow", "mode": "ps", "replicas": 2, "ps_replicas": 2},
    "generic": {
        "framework": "generic",
        "program": None,
        "command": ["sh", "-c", "echo hi"],
        "replicas": 4,
        "data": "/srv/data",
    },
}


def docs_by_kind(job) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in job.documents:
        out.setdefault(d["kind"], []).append(d)
    return out


@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_kubernetes_manifests_pass_strict_schema_and_client_models(cat: Catalog, case: str) -> None:
    job = render(req(**REQUESTS[case]), cat, "kubernetes")
    assert validate_schema(job.documents, KUBERNETES_VERSION, strict=True) == []
    models = to_models(job.documents)
    assert [type(m).__name__ for m in models] == [
        {"Job": "V1Job", "Service": "V1Service"}[d["kind"]] for d in job.documents
    ]
    # the file is exactly the documents (what `streamctl jobs render` prints)
    assert list(yaml.safe_load_all(job.text)) == list(job.documents)
    for j in job.jobs():
        assert j["apiVersion"] == "batch/v1"
        assert j["spec"]["completionMode"] == "Indexed"
        assert j["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_ddp_has_a_headless_service_and_the_rendezvous_environment(cat: Catalog) -> None:
    job = render(req(**REQUESTS["pytorch-ddp"]), cat, "kubernetes")
    kinds = docs_by_kind(job)
    (svc,) = kinds["Service"]
    (j,) = kinds["Job"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"hotwire.io/job": "job"}
    assert j["spec"]["completions"] == j["spec"]["parallelism"] == 3
    pod = j["spec"]["template"]["spec"]
    assert pod["subdomain"] == "job"
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MASTER_ADDR"] == "job-0.job"
    assert env["MASTER_PORT"] == "29500"
    assert env["WORLD_SIZE"] == "6"
    assert env["RANK"] == "$(JOB_COMPLETION_INDEX)"
    assert env["DDP_BACKEND"] == "gloo"
    assert c["command"][:3] == ["python3", "-m", "torch.distributed.run"]
    assert "--nnodes=3" in c["command"] and "--nproc_per_node=2" in c["command"]
    assert c["command"][-3:] == ["/workspace/program/train.py", "--lr", "0.1"]
    assert c["resources"] == {
        "requests": {"cpu": "1500m", "memory": "2Gi"},
        "limits": {"cpu": "1500m", "memory": "2Gi"},
    }


def test_gpu_requests_become_nvidia_limits(cat: Catalog) -> None:
    job = render(req(**REQUESTS["pytorch-ddp-gpu"]), cat, "kubernetes")
    c = job.jobs()[0]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert c["image"].startswith("docker.io/pytorch/pytorch:2.5.1-cuda")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["DDP_BACKEND"] == "nccl"


def test_tensorflow_ps_carries_tf_config_per_task(cat: Catalog) -> None:
    job = render(req(**REQUESTS["tensorflow-ps"]), cat, "kubernetes")
    ps, worker = job.jobs()
    assert ps["metadata"]["name"] == "job-ps" and worker["metadata"]["name"] == "job-worker"
    assert ps["metadata"]["annotations"] == {"hotwire.io/daemon": "true"}
    reps = replicas_of(job.documents)
    configs = [json.loads(r.env_dict["TF_CONFIG"]) for r in reps]
    assert [c["task"] for c in configs] == [
        {"type": "ps", "index": 0},
        {"type": "ps", "index": 1},
        {"type": "worker", "index": 0},
        {"type": "worker", "index": 1},
    ]
    assert configs[0]["cluster"] == {
        "ps": ["job-ps-0.job:2222", "job-ps-1.job:2222"],
        "worker": ["job-worker-0.job:2222", "job-worker-1.job:2222"],
    }


def test_local_rendering_uses_the_local_interpreter_and_free_ports(
    cat: Catalog, tmp_path: Path
) -> None:
    import sys

    prog = tmp_path / "train.py"
    prog.write_text("")
    job = render(req(mode="ddp", replicas=2, program=str(prog)), cat, "local")
    (r0, r1) = replicas_of(job.documents)
    assert r0.command[0] == sys.executable
    assert r0.working_dir == str(tmp_path)
    assert "--node_rank=0" in r0.command and "--node_rank=1" in r1.command
    assert r0.env_dict["MASTER_ADDR"] == "127.0.0.1"
    assert int(r0.env_dict["MASTER_PORT"]) > 0
    assert (r0.env_dict["RANK"], r1.env_dict["RANK"]) == ("0", "1")
    assert r0.env_dict["HOTWIRE_REPLICA"] == "0" and r0.env_dict["EXTRA"] == "yes"
    assert not r0.volumes


def test_containers_mount_program_and_data(cat: Catalog, tmp_path: Path) -> None:
    prog = tmp_path / "score.py"
    prog.write_text("")
    job = render(req(program=str(prog), data=str(tmp_path)), cat, "podman")
    (r,) = replicas_of(job.documents)
    assert r.command[:2] == ("python3", "/workspace/program/score.py")
    assert (str(tmp_path), "/workspace/program", True) in r.volumes
    assert (str(tmp_path), "/workspace/data", False) in r.volumes
    assert r.env_dict["HOTWIRE_DATA"] == "/workspace/data"


def test_a_missing_local_program_is_a_request_error(cat: Catalog, tmp_path: Path) -> None:
    from hotwire.jobs import RequestError

    with pytest.raises(RequestError, match=r"program: .*missing.py does not exist"):
        render(req(program=str(tmp_path / "missing.py")), cat, "local")


# -- negative cases: what the schema and the client models reject ---------------------


def _first_job(cat: Catalog) -> dict:
    return copy.deepcopy(render(req(), cat, "kubernetes").jobs()[0])


def test_schema_rejects_unknown_fields_wrong_types_and_missing_parts(cat: Catalog) -> None:
    unknown = _first_job(cat)
    unknown["spec"]["replicas"] = 2  # a Deployment field, not a Job's
    wrong_type = _first_job(cat)
    wrong_type["spec"]["completions"] = "three"
    no_containers = _first_job(cat)
    del no_containers["spec"]["template"]["spec"]["containers"]
    bad_env = _first_job(cat)
    bad_env["spec"]["template"]["spec"]["containers"][0]["env"].append({"value": "no name"})
    for doc, needle in [
        (unknown, "Additional properties are not allowed ('replicas' was unexpected)"),
        (wrong_type, "spec.completions: 'three' is not of type 'integer'"),
        (no_containers, "'containers' is a required property"),
        (bad_env, "'name' is a required property"),
    ]:
        problems = validate_schema([doc])
        assert len(problems) == 1 and needle in problems[0], problems
        assert problems[0].startswith("Job/job: ")


def test_client_models_reject_what_kubernetes_would(cat: Catalog) -> None:
    int_quantity = _first_job(cat)
    int_quantity["spec"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"nvidia.com/gpu": 1}
    }
    with pytest.raises(ValueError, match="client model rejects it"):
        to_models([int_quantity])
    unknown = _first_job(cat)
    unknown["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(ValueError, match=r"\.gpus is dropped"):
        to_models([unknown])
    with pytest.raises(ValueError, match="no client model for apiVersion apps/v1 kind Deployment"):
        to_models([{"apiVersion": "apps/v1", "kind": "Deployment"}])


def test_a_broken_user_template_is_caught(cat: Catalog, tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    head = "{#---\nid: %s\nframework: pytorch\nmode: %s\n---#}\n"
    (tmp_path / "templates" / "a.j2").write_text(head % ("undef", "a") + "x: {{ nope }}\n")
    (tmp_path / "templates" / "b.j2").write_text(head % ("badyaml", "b") + "a: [\n")
    (tmp_path / "templates" / "c.j2").write_text(
        head % ("nojob", "c") + "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    )
    (tmp_path / "templates" / "d.j2").write_text(
        head % ("badjob", "d") + "{% import '_pod.j2' as pod with context %}\n"
        "{{ pod.job(name, 'two', main, env) }}\n"
    )
    user = Catalog.load([tmp_path], use_env=False)
    with pytest.raises(RenderError, match=r"undef .* failed to render: 'nope' is undefined"):
        render(req(mode="a"), user, "kubernetes")
    with pytest.raises(RenderError, match=r"badyaml .* rendered invalid YAML"):
        render(req(mode="b"), user, "kubernetes")
    with pytest.raises(RenderError, match=r"nojob .* rendered no batch/v1 Job"):
        render(req(mode="c"), user, "kubernetes")
    job = render(req(mode="d"), user, "kubernetes")  # renders, but Kubernetes would refuse it
    assert any("'two' is not of type 'integer'" in p for p in validate_schema(job.documents))


def test_env_references_expand_like_kubernetes() -> None:
    env = {"A": "1", "B": "x"}
    assert expand_refs("$(A)-$(B)-$(C)-$$(A)", env) == "1-x-$(C)-$(A)"
