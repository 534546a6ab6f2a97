"""``streamctl jobs``: the catalogs, rendering and running jobs from the command line.

The click group :data:`jobs` is added to ``streamctl`` by the main CLI. Errors
print one line on stderr and exit 1 (``--debug`` shows the traceback); usage
errors exit 2; ``--json`` prints one JSON document.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from hotwire.jobs.backends import BACKEND_ENV, Backend, get_backend
from hotwire.jobs.catalog import Catalog
from hotwire.jobs.errors import JobError
from hotwire.jobs.render import render
from hotwire.jobs.request import BACKENDS, CatalogNames, JobRequest, load_request

_catalog_opt = click.option(
    "--catalog",
    "catalogs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="A user catalog directory (templates/*.j2, images.yaml); repeatable. "
    "Also HOTWIRE_JOBS_CATALOG.",
)
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
_backend_opt = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=None,
    help=f"Container-scheduler backend (default: the request's, ${BACKEND_ENV}, or local).",
)
_state_opt = click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="local backend: where jobs live (default $HOTWIRE_JOBS_STATE).",
)
_kube_opt = click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    default=None,
    help="kubernetes backend: the kubeconfig file (default ~/.kube/config).",
)


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (JobError, OSError) as e:
            ctx = click.get_current_context()
            if (ctx.find_root().obj or {}).get("debug") or (ctx.obj or {}).get("debug"):
                traceback.print_exc()
            msg = " ".join(str(e).split())
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)

    return wrapper


def _backend(
    name: str | None,
    state_dir: str | None = None,
    kubeconfig: str | None = None,
    namespace: str | None = None,
) -> Backend:
    from hotwire.jobs.backends import default_backend

    name = name or default_backend()
    opts: dict[str, Any] = {}
    if name == "local" and state_dir:
        opts["state_dir"] = state_dir
    if name == "kubernetes":
        if kubeconfig:
            opts["kubeconfig"] = kubeconfig
        if namespace:
            opts["namespace"] = namespace
    return get_backend(name, **opts)


def _load(request: str, cat: Catalog) -> JobRequest:
    """The request file, validated in one pass with its names checked against ``cat``."""
    names = CatalogNames.of(cat.templates.values(), cat.images.values())
    return load_request(request, names=names)


def _print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


@click.group("jobs")
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks.")
@click.pass_context
def jobs(ctx: click.Context, debug: bool) -> None:
    """Deep-learning jobs: catalogs, rendering, submitting, status."""
    ctx.ensure_object(dict)
    if debug:
        ctx.obj["debug"] = True


@jobs.command("templates")
@_catalog_opt
@_json_opt
@_fail_cleanly
def templates_cmd(catalogs: tuple[str, ...], as_json: bool) -> None:
    """List the job-description templates."""
    cat = Catalog.load(catalogs)
    rows = [t.summary() for t in sorted(cat.templates.values(), key=lambda t: t.id)]
    if as_json:
        _print_json({"templates": rows})
        return
    click.echo(f"{'ID':<18} {'FRAMEWORK':<11} {'MODE':<7} {'ACCEL':<8} {'SOURCE':<8} DESCRIPTION")
    for r in rows:
        click.echo(
            f"{r['id']:<18} {r['framework']:<11} {r['mode']:<7} "
            f"{','.join(r['accelerators']):<8} {_short(r['source']):<8} {r['description']}"
        )


@jobs.command("images")
@_catalog_opt
@_json_opt
@_fail_cleanly
def images_cmd(catalogs: tuple[str, ...], as_json: bool) -> None:
    """List the base images and how each backend realises them."""
    cat = Catalog.load(catalogs)
    rows = [i.summary() for i in sorted(cat.images.values(), key=lambda i: i.id)]
    if as_json:
        _print_json({"images": rows})
        return
    click.echo(f"{'ID':<20} {'FRAMEWORK':<11} {'VERSION':<8} {'ACCEL':<6} BACKENDS")
    for r in rows:
        real = "; ".join(
            f"{b}={v.get('image') or v.get('venv') or v.get('python')}"
            for b, v in r["backends"].items()
        )
        click.echo(
            f"{r['id']:<20} {r['framework']:<11} {r['version']:<8} {r['accelerator']:<6} {real}"
        )


def _short(source: str) -> str:
    return "shipped" if source == "shipped" else "user"


@jobs.command("render")
@click.argument("request", type=click.Path(dir_okay=False))
@_backend_opt
@_catalog_opt
@click.option(
    "--validate",
    is_flag=True,
    help="Also check the manifests against the pinned Kubernetes schema (strict).",
)
@_fail_cleanly
def render_cmd(
    request: str, backend: str | None, catalogs: tuple[str, ...], validate: bool
) -> None:
    """Print the job-description file REQUEST (YAML or JSON) renders to."""
    from hotwire.jobs.backends import default_backend

    cat = Catalog.load(catalogs)
    req = _load(request, cat)
    b = backend or req.backend or default_backend()
    job = render(req, cat, b)
    if validate:
        from hotwire.jobs.k8s import KUBERNETES_VERSION, validate_schema

        problems = validate_schema(job.documents)
        if problems:
            raise JobError(
                f"the rendered file fails the Kubernetes {KUBERNETES_VERSION} "
                f"schema: {'; '.join(problems)}"
            )
    click.echo(job.text, nl=not job.text.endswith("\n"))


@jobs.command("submit")
@click.argument("request", type=click.Path(dir_okay=False))
@_backend_opt
@_catalog_opt
@_state_opt
@_kube_opt
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Wait up to SECONDS for the job to finish; exit 1 unless it succeeded.",
)
@_json_opt
@_fail_cleanly
def submit_cmd(
    request: str,
    backend: str | None,
    catalogs: tuple[str, ...],
    state_dir: str | None,
    kubeconfig: str | None,
    wait_s: float | None,
    as_json: bool,
) -> None:
    """Render REQUEST and start the job on a backend."""
    from hotwire.jobs.backends import default_backend

    cat = Catalog.load(catalogs)
    req = _load(request, cat)
    bname = backend or req.backend or default_backend()
    b = _backend(bname, state_dir, kubeconfig, req.namespace)
    job = render(req, cat, bname)
    st = b.submit(job)
    if wait_s is not None:
        st = b.wait(job.name, wait_s)
    if as_json:
        _print_json({**st.to_dict(), "template": job.template.id, "image": job.image.id})
    else:
        click.echo(
            f"job {job.name} ({job.template.id}, {job.image.id}) on {bname}: {st.state}"
            f"{' - ' + st.message if st.message else ''}"
        )
    if wait_s is not None and st.state != "succeeded":
        sys.exit(1)


@jobs.command("status")
@click.argument("name", required=False)
@_backend_opt
@_state_opt
@_kube_opt
@click.option("--namespace", default=None, help="kubernetes backend: the namespace.")
@_json_opt
@_fail_cleanly
def status_cmd(
    name: str | None,
    backend: str | None,
    state_dir: str | None,
    kubeconfig: str | None,
    namespace: str | None,
    as_json: bool,
) -> None:
    """Show one job's status, or every job's."""
    b = _backend(backend, state_dir, kubeconfig, namespace)
    sts = [b.status(name)] if name else b.list()
    if as_json:
        _print_json(sts[0].to_dict() if name else {"jobs": [s.to_dict() for s in sts]})
        return
    if not sts:
        click.echo(f"no jobs on backend {b.name}")
    for s in sts:
        reps = ", ".join(
            f"{r.name}={r.state}{'' if r.exit_code is None else f'({r.exit_code})'}"
            for r in s.replicas
        )
        click.echo(f"{s.name:<32} {s.state:<10} {reps}{'  ' + s.message if s.message else ''}")


@jobs.command("stop")
@click.argument("name")
@_backend_opt
@_state_opt
@_kube_opt
@click.option("--namespace", default=None, help="kubernetes backend: the namespace.")
@_json_opt
@_fail_cleanly
def stop_cmd(
    name: str,
    backend: str | None,
    state_dir: str | None,
    kubeconfig: str | None,
    namespace: str | None,
    as_json: bool,
) -> None:
    """Stop every replica of job NAME."""
    b = _backend(backend, state_dir, kubeconfig, namespace)
    st = b.stop(name)
    if as_json:
        _print_json(st.to_dict())
    else:
        click.echo(f"job {name}: {st.state}")


@jobs.command("logs")
@click.argument("name")
@_backend_opt
@_state_opt
@_kube_opt
@click.option("--namespace", default=None, help="kubernetes backend: the namespace.")
@_fail_cleanly
def logs_cmd(
    name: str,
    backend: str | None,
    state_dir: str | None,
    kubeconfig: str | None,
    namespace: str | None,
) -> None:
    """Print each replica's output."""
    b = _backend(backend, state_dir, kubeconfig, namespace)
    for rep, text in b.logs(name).items():
        click.echo(f"==> {rep} <==")
        click.echo(text, nl=not text.endswith("\n"))
