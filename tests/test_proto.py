"""The generated protobuf code matches hotwire.proto, and both daemons serve gRPC health."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotwire.testing.cluster import LocalCluster

PROTO_DIR = Path(__file__).resolve().parent.parent / "hotwire" / "proto"


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the code")
    from hotwire.proto.build import build

    for fresh in build(tmp_path):
        committed = PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run `python -m hotwire.proto.build` and commit it"
        )


def _check(addr: str, service: str = "") -> int:
    with grpc.insecure_channel(addr) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_master_and_workers_serve_health(cluster: LocalCluster) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _check(cluster.address) == serving
    assert _check(cluster.address, "hotwire.Master") == serving
    for w in cluster.client.workers().workers:
        assert _check(w.health_address) == serving
        assert _check(w.health_address, "hotwire.Worker") == serving
