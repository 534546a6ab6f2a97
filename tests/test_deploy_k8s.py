"""``streamctl deploy k8s``: manifests that pass strict schema validation for three
cluster sizes, and whose container commands really start a master and a worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotwire.deploy.k8s import DATA_PORT, HEALTH_PORT, MASTER_PORT, manifests
from hotwire.testing.cluster import _Proc, poll_for

if os.environ.get("CI"):  # under CI the validator must be there (scripts/setup.sh --full)
    import kubernetes_validate
else:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")


def _by_kind(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _streamctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotwire.cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("workers", [1, 3, 10])
def test_manifests_pass_strict_validation_for_three_sizes(tmp_path: Path, workers: int) -> None:
    out = tmp_path / "k.yaml"
    r = _streamctl(
        "deploy", "k8s", "--workers", str(workers), "--namespace", "streams", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    objs = list(yaml.safe_load_all(out.read_text()))
    for o in objs:
        kubernetes_validate.validate(o, "1.37.0", strict=True)
    k = _by_kind(objs)
    assert {o["metadata"].get("namespace", "streams") for o in objs} == {"streams"}
    master, worker = k[("StatefulSet", "hotwire-master")], k[("StatefulSet", "hotwire-worker")]
    assert worker["spec"]["replicas"] == workers and master["spec"]["replicas"] == 1
    assert master["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "store"
    assert k[("PodDisruptionBudget", "hotwire-worker")]["spec"]["maxUnavailable"] == 1
    for ss, port in ((master, MASTER_PORT), (worker, HEALTH_PORT)):
        (c,) = ss["spec"]["template"]["spec"]["containers"]
        sec = c["securityContext"]
        assert sec["runAsNonRoot"] and sec["readOnlyRootFilesystem"], sec
        assert sec["capabilities"] == {"drop": ["ALL"]} and not sec["allowPrivilegeEscalation"]
        assert c["readinessProbe"]["grpc"]["port"] == port == c["livenessProbe"]["grpc"]["port"]
        assert port in {p["containerPort"] for p in c["ports"]}
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    (wc,) = worker["spec"]["template"]["spec"]["containers"]
    assert "kill -TERM 1" in " ".join(wc["lifecycle"]["preStop"]["exec"]["command"])
    data = k[("NetworkPolicy", "hotwire-data-plane")]["spec"]["ingress"][0]
    assert data["ports"] == [{"protocol": "TCP", "port": DATA_PORT}]
    assert data["from"] == [{"podSelector": worker["spec"]["selector"]}]
    rules = k[("Role", "hotwire-jobs")]["rules"]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in rules)


def test_a_bad_namespace_is_refused_in_one_line() -> None:
    r = _streamctl("deploy", "k8s", "--namespace", "Not_A_Label")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "streamctl: namespace 'Not_A_Label' is not a DNS label (lower-case letters, digits "
        "and '-', at most 63, starting and ending with a letter or digit)"
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serving(address: str) -> bool:
    """The check a Kubernetes gRPC probe makes."""
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def test_the_rendered_commands_start_a_master_and_a_worker(tmp_path: Path) -> None:
    """The containers' arguments, with the pod's addresses mapped to loopback ports,
    start a master and a worker that registers and answers its health probe."""
    k = _by_kind(manifests(namespace="ns1", workers=1))
    (mc,) = k[("StatefulSet", "hotwire-master")]["spec"]["template"]["spec"]["containers"]
    (wc,) = k[("StatefulSet", "hotwire-worker")]["spec"]["template"]["spec"]["containers"]
    mport, dport, hport = _free_port(), _free_port(), _free_port()
    pod = "hotwire-worker-0"
    local = {
        f"0.0.0.0:{MASTER_PORT}": f"127.0.0.1:{mport}",
        "/var/lib/hotwire": str(tmp_path / "store"),
        f"hotwire-master.ns1.svc:{MASTER_PORT}": f"127.0.0.1:{mport}",
        "$(POD_NAME)": pod,
        f"0.0.0.0:{DATA_PORT}": f"127.0.0.1:{dport}",
        f"$(POD_NAME).hotwire-workers.ns1.svc:{DATA_PORT}": f"127.0.0.1:{dport}",
        str(HEALTH_PORT): str(hport),
        "/tmp/hotwire": str(tmp_path / "bundles"),
    }
    cmd = [sys.executable, "-m", "hotwire.cli"]
    master = _Proc(
        "master",
        [*cmd, *(local.get(a, a) for a in mc["args"])],
        tmp_path / "master.log",
        r"master listening on (\S+)",
    )
    worker = None
    try:
        assert master.wait_address() == f"127.0.0.1:{mport}"
        poll_for(lambda: _serving(f"127.0.0.1:{mport}"), 30, what="the master's probe")
        worker = _Proc(
            pod,
            [*cmd, *(local.get(a, a) for a in wc["args"])],
            tmp_path / "worker.log",
            r"data plane on (\S+)",
        )
        worker.wait_address()
        poll_for(lambda: _serving(f"127.0.0.1:{hport}"), 30, what="the worker's probe")
        r = _streamctl("--master", f"127.0.0.1:{mport}", "workers", "--json")
        assert r.returncode == 0, r.stderr
        assert pod in r.stdout and f"127.0.0.1:{dport}" in r.stdout
    finally:
        if worker is not None:
            worker.stop()
        master.stop()
