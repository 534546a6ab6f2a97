"""``streamctl deploy``: render what a deployment needs."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
def deploy() -> None:
    """Render deployment manifests."""


@deploy.command("k8s")
@click.option("--namespace", default="hotwire", show_default=True)
@click.option("--image", default="hotwire:latest", show_default=True, help="hotwire's image")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--slots", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--storage", default="1Gi", show_default=True, help="the master store's volume")
@click.option("--worker-cpu", default="1", show_default=True)
@click.option("--worker-memory", default="2Gi", show_default=True)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(dir_okay=False),
    help="write to this file (default: stdout)",
)
def k8s(
    namespace: str,
    image: str,
    workers: int,
    slots: int,
    storage: str,
    worker_cpu: str,
    worker_memory: str,
    output: str | None,
) -> None:
    """Kubernetes manifests: master and worker StatefulSets, Services, RBAC for
    deep-learning jobs, a PodDisruptionBudget and NetworkPolicies (docs/deploy.md)."""
    from hotwire.cli import _run
    from hotwire.deploy.k8s import render

    text = _run(
        lambda: render(
            namespace=namespace,
            image=image,
            workers=workers,
            slots=slots,
            storage=storage,
            worker_cpu=worker_cpu,
            worker_memory=worker_memory,
        )
    )
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)


@click.command()
@click.argument("address", default="127.0.0.1:7600", envvar="HOTWIRE_HEALTH")
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(min=0.1))
def health(address: str, timeout: float) -> None:
    """Check the gRPC health service at ADDRESS ($HOTWIRE_HEALTH; a master's port or a
    worker's --health-port): exit 0 when it is serving, else 1 with the reason (a
    container's health check)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hotwire.cli import Failure, _run
    from hotwire.security.tls import ClientCredentials, client_credentials, dial

    obj = click.get_current_context().find_root().obj or {}
    creds = client_credentials(address, obj.get("ca"), obj.get("cert"), obj.get("key"), None)

    def check() -> None:
        with dial(address, ClientCredentials(creds.tls), []) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            r = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            raise Failure(f"{address} is {name}")
        click.echo(f"{address} is SERVING")

    _run(check)
