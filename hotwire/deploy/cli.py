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
