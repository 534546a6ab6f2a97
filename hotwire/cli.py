"""streamctl: run and operate hotwire clusters and apps (DESIGN 1.3).

Exit status: 0 success, 1 refused or failed (one line on stderr; ``--debug``
adds the traceback), 2 usage error. Reading commands take ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click
import grpc

DEFAULT_MASTER = "127.0.0.1:7600"


class Failure(Exception):
    """A refused or failed command: printed as one line, exit status 1."""


def _fail_from_rpc(e: grpc.RpcError) -> Failure:
    code = e.code()
    details = e.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        ctx = click.get_current_context(silent=True)
        profile = ((ctx and ctx.find_root().obj) or {}).get("profile_used")
        if profile is not None:  # a stale profile (its cluster gone, the port reused) reads so
            details += (
                f" (TLS credentials from the profile in {profile}; "
                "delete it if that cluster is gone)"
            )
        return Failure(f"cannot reach the master: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Failure(f"the master did not answer in time: {details}")
    return Failure(details)


def _run(fn: Callable[[], Any]) -> Any:
    ctx = click.get_current_context()
    debug = ctx.find_root().params.get("debug", False)
    try:
        return fn()
    except grpc.RpcError as e:
        err: Exception = _fail_from_rpc(e)
        cause: BaseException = e
    except Failure as e:
        err, cause = e, e
    except Exception as e:  # AppLoadError, ValidationError, OSError, ...
        err, cause = Failure(str(e) or type(e).__name__), e
    if debug:
        traceback.print_exception(cause)
    click.echo(f"streamctl: {str(err).splitlines()[0] if str(err) else 'failed'}", err=True)
    sys.exit(1)


def _client(master: str) -> Any:
    """A client of ``master`` with the credentials given to streamctl (flags, the
    ``HOTWIRE_*`` variables, else the profile of that master)."""
    from hotwire.client import Client
    from hotwire.security.tls import client_credentials

    obj = click.get_current_context().find_root().obj or {}
    creds = client_credentials(
        master, obj.get("ca"), obj.get("cert"), obj.get("key"), obj.get("token")
    )
    if creds.profile is not None:
        obj["profile_used"] = creds.profile
    return Client(master, creds)


def _emit(as_json: bool, doc: Any, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        human()


def _setup_logging(level: str, fmt: str = "text") -> None:
    from hotwire.logs import setup_logging

    setup_logging(level, fmt)


def _check_metrics(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--metrics HOST:PORT``: a usage error in one line if malformed."""
    if value is None:
        return None
    from hotwire.metrics import parse_address

    try:
        parse_address(value)
    except ValueError as e:
        raise click.BadParameter(str(e).split(": ", 1)[1]) from None
    return value


def _check_dashboard(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--dashboard HOST:PORT``: a usage error in one line if malformed."""
    if value is None:
        return None
    from hotwire.master.dashboard import parse_address

    try:
        parse_address(value)
    except ValueError as e:
        raise click.BadParameter(str(e).split(": ", 1)[1]) from None
    return value


def _observability(cmd: Callable[..., Any]) -> Callable[..., Any]:
    """The --metrics and --log-format options of the master and the worker."""
    cmd = click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="json: one JSON object per line (time, level, logger, message, app, pe, "
        "instance, transition, worker)",
    )(cmd)
    return click.option(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        callback=_check_metrics,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (port 0: any free "
        "port, logged), or https:// with the node's certificate when it runs TLS; off by "
        "default",
    )(cmd)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--master",
    "master",
    default=lambda: os.environ.get("HOTWIRE_MASTER", DEFAULT_MASTER),
    show_default="$HOTWIRE_MASTER or 127.0.0.1:7600",
    help="master address HOST:PORT (also accepted after the command)",
)
@click.option("--ca", default=None, metavar="FILE", help="cluster CA certificate ($HOTWIRE_CA)")
@click.option("--cert", default=None, metavar="FILE", help="client certificate ($HOTWIRE_CERT)")
@click.option("--key", default=None, metavar="FILE", help="client key ($HOTWIRE_KEY)")
@click.option("--token", default=None, help="bearer token ($HOTWIRE_TOKEN)")
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.pass_context
def main(
    ctx: click.Context,
    master: str,
    ca: str | None,
    cert: str | None,
    key: str | None,
    token: str | None,
    debug: bool,
) -> None:
    """hotwire: stream processing with online upgrades.

    A client reaches a master with TLS and a token given by --ca/--cert/--key/--token,
    else by HOTWIRE_CA/HOTWIRE_CERT/HOTWIRE_KEY/HOTWIRE_TOKEN, else from the profile
    `streamctl up` or `streamctl init` wrote for that master address
    (under $HOTWIRE_HOME, default ~/.config/hotwire).
    """
    ctx.ensure_object(dict).update(
        master=master, ca=ca, cert=cert, key=key, token=token, debug=debug
    )


# Commands that run the master themselves take --listen instead of --master.
_NO_MASTER_OPTION = frozenset({"master", "up", "init", "cert"})


def _store_master(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--master`` given after a command: it wins over the one before the command."""
    if value is not None:
        ctx.ensure_object(dict)["master"] = value


def _accept_master_after(group: click.Group) -> None:
    """Give every subcommand of ``group`` (recursively) the group's ``--master`` option.

    ``streamctl worker --master H:P`` and ``streamctl --master H:P worker`` are the
    same; given in both places, the one after the command wins. The value goes into
    ``ctx.obj["master"]``, which every command reads.
    """
    for name, cmd in group.commands.items():
        if name in _NO_MASTER_OPTION or any(p.name == "master" for p in cmd.params):
            continue
        cmd.params.append(
            click.Option(
                ["--master"],
                default=None,
                metavar="HOST:PORT",
                expose_value=False,
                callback=_store_master,
                help="master address (overrides a --master given before the command)",
            )
        )
        if isinstance(cmd, click.Group):
            _accept_master_after(cmd)


# ---------------------------------------------------------------------------
# Daemons
# ---------------------------------------------------------------------------


@main.command()
@click.option("--listen", default=DEFAULT_MASTER, show_default=True, help="gRPC address HOST:PORT")
@click.option(
    "--data-dir",
    default="hotwire-data",
    show_default=True,
    type=click.Path(),
    help="where the master keeps its state",
)
@click.option(
    "--heartbeat-timeout",
    default=5.0,
    show_default=True,
    help="seconds without a heartbeat before a worker counts as dead",
)
@click.option(
    "--checkpoint-interval",
    default=2.0,
    show_default=True,
    help="seconds between checkpoints of each app (0: none)",
)
@click.option(
    "--switch-timeout",
    default=30.0,
    show_default=True,
    help="seconds a switch may take before the app restarts from its last checkpoint",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="no TLS and no tokens even on a non-loopback address (anyone who reaches the "
    "port can run code on every worker)",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--dashboard",
    default=None,
    metavar="HOST:PORT",
    callback=_check_dashboard,
    help="serve the read-only web dashboard on HOST:PORT (port 0: any free port, logged; "
    "HTTPS and a viewer or admin token when the master has TLS); off by default",
)
@_observability
def master(
    listen: str,
    data_dir: str,
    heartbeat_timeout: float,
    checkpoint_interval: float,
    switch_timeout: float,
    insecure: bool,
    log_level: str,
    dashboard: str | None,
    metrics: str | None,
    log_format: str,
) -> None:
    """Run the master.

    It runs mTLS with tokens when DATA_DIR/tls holds its certificate (`streamctl
    init`), else plaintext: on a loopback address only, unless --insecure.
    """
    from hotwire.logs import announce
    from hotwire.master.access import master_tls
    from hotwire.master.service import Master
    from hotwire.node import install_uvloop, tune_gc

    _setup_logging(log_level, log_format)
    install_uvloop()
    tune_gc()

    async def serve() -> None:
        tls = None if insecure else master_tls(data_dir)
        if insecure:
            announce(
                "streamctl master: WARNING: --insecure: no TLS, no tokens; anyone who reaches "
                f"{listen} can run code on every worker",
                logging.WARNING,
            )
        m = Master(
            listen=listen,
            data_dir=data_dir,
            heartbeat_timeout=heartbeat_timeout,
            checkpoint_interval=checkpoint_interval,
            switch_timeout=switch_timeout,
            tls=tls,
            insecure=insecure,
            metrics=metrics,
            dashboard=dashboard,
        )
        await m.start()
        how = "mTLS, tokens" if tls is not None else "plaintext"
        announce(f"master listening on {m.address} ({how})")
        if m.metrics_address:
            announce(f"master metrics on {m.metrics_address}")
        if m.dashboard_address:
            scheme = "https" if tls is not None else "http"
            announce(
                f"master dashboard on {m.dashboard_address} ({scheme}://{m.dashboard_address}/)"
            )
        await _until_signalled()
        await m.close()

    _run(lambda: asyncio.run(serve()))


@main.command()
@click.option(
    "--listen", default="127.0.0.1:0", show_default=True, help="data-plane address HOST:PORT"
)
@click.option(
    "--advertise",
    default=None,
    metavar="HOST:PORT",
    help="data-plane address the other workers dial (default: the --listen address), "
    "for NAT or a proxy in front of this worker",
)
@click.option(
    "--link-timeout",
    default=15.0,  # hotwire.worker.transport.LINK_TIMEOUT_S
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="seconds a data link to another worker may stay down before this worker reports "
    "it and the master restarts the apps using it from their last checkpoint (keep it "
    "above the master's --heartbeat-timeout, so a dead worker is handled as such first)",
)
@click.option("--name", default=None, help="worker name (default host-pid)")
@click.option(
    "--slots",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="how many PE instances this worker runs at most",
)
@click.option(
    "--data-dir", default=None, type=click.Path(), help="bundle cache (default: a temp dir)"
)
@click.option(
    "--drain/--no-drain",
    default=True,
    show_default=True,
    help="on SIGINT/SIGTERM, ask the master to move this worker's instances to the other "
    "workers before stopping (--no-drain: stop at once, as when the whole cluster stops)",
)
@click.option(
    "--worker-cert",
    default=None,
    envvar="HOTWIRE_WORKER_CERT",
    metavar="FILE",
    help="this worker's certificate ($HOTWIRE_WORKER_CERT; `streamctl cert worker`): "
    "mTLS to the master and on the data plane; the name in it is the worker's name. "
    "Needs --ca (or $HOTWIRE_CA)",
)
@click.option(
    "--worker-key",
    default=None,
    envvar="HOTWIRE_WORKER_KEY",
    metavar="FILE",
    help="its key ($HOTWIRE_WORKER_KEY)",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="no TLS even on a non-loopback address (anyone who reaches the data port can "
    "inject records)",
)
@click.option(
    "--health-port",
    default=0,
    show_default=True,
    type=click.IntRange(min=0, max=65535),
    help="port of the worker's gRPC health service, on the --listen host (0: any free "
    "port; give one for probes, as in Kubernetes)",
)
@click.option("--log-level", default="info", show_default=True)
@_observability
@click.pass_context
def worker(
    ctx: click.Context,
    listen: str,
    advertise: str | None,
    link_timeout: float,
    name: str | None,
    slots: int,
    data_dir: str | None,
    drain: bool,
    worker_cert: str | None,
    worker_key: str | None,
    insecure: bool,
    health_port: int,
    log_level: str,
    metrics: str | None,
    log_format: str,
) -> None:
    """Run a worker daemon."""
    from hotwire.logs import announce, set_process_fields
    from hotwire.node import install_uvloop, tune_gc
    from hotwire.security.tls import TlsFiles
    from hotwire.worker.daemon import Worker

    tls = None
    ca = ctx.find_root().obj.get("ca") or os.environ.get("HOTWIRE_CA")
    if worker_cert or worker_key:
        if not (ca and worker_cert and worker_key):
            raise click.UsageError("a worker with TLS needs --ca, --worker-cert and --worker-key")
        tls = _run(lambda: TlsFiles.of(ca, worker_cert, worker_key))
    _setup_logging(log_level, log_format)
    set_process_fields(worker=name)
    if insecure:
        announce(
            "streamctl worker: WARNING: --insecure: no TLS; anyone who reaches the data port "
            "can inject records",
            logging.WARNING,
        )

    install_uvloop()
    tune_gc()

    async def serve() -> None:
        w = Worker(
            master=ctx.obj["master"],
            listen=listen,
            name=name,
            slots=slots,
            data_dir=data_dir,
            advertise=advertise,
            link_timeout=link_timeout,
            tls=tls,
            insecure=insecure,
            health_port=health_port,
            metrics=metrics,
        )
        set_process_fields(worker=w.name)
        await w.start(timeout=3600)
        listening = w.runtime.dataplane.address
        shown = f" (advertised as {w.data_address})" if w.data_address != listening else ""
        announce(f"worker {w.name} data plane on {listening}{shown}")
        if w.metrics_address:
            announce(f"worker {w.name} metrics on {w.metrics_address}")
        await _until_signalled()
        if drain:
            # Graceful stop: the master moves this worker's instances away first.
            try:
                moved = await w.drain()
                announce(f"worker {w.name}: {moved} instances moved to other workers")
            except grpc.RpcError as e:
                announce(
                    f"worker {w.name}: could not drain ({e.details()}); stopping", logging.WARNING
                )
        await w.close()

    _run(lambda: asyncio.run(serve()))


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@main.command()
@click.argument("app", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--workers", "n_workers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--listen", default=DEFAULT_MASTER, show_default=True, help="master address")
@click.option(
    "--data-dir", default=None, type=click.Path(), help="master state (default: a temp dir)"
)
@click.option("--slots", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--insecure", is_flag=True, help="plaintext, no tokens (loopback only)")
def up(
    app: str | None,
    n_workers: int,
    listen: str,
    data_dir: str | None,
    slots: int,
    insecure: bool,
) -> None:
    """Run a local cluster (master + N workers), submitting APP if given; Ctrl-C stops it.

    The cluster runs mTLS with tokens: a CA, certificates and an admin token are made in
    its data directory (kept there for the next `up` with the same --data-dir), and a
    profile for the master's address is written under $HOTWIRE_HOME (default
    ~/.config/hotwire), so streamctl in other shells of this user reaches the cluster
    with no flags; the lines to export for other users or machines are printed.

    Ctrl-C (SIGINT) or SIGTERM is the ordinary way to stop the cluster: the workers and
    the master stop (the workers without draining, since nothing is left to move their
    instances to) and the exit status is 0. It is 1 if the cluster could not start or
    one of its processes died.
    """
    import tempfile

    from hotwire.master.access import bootstrap, tls_dir
    from hotwire.security import pki
    from hotwire.security.tls import ClientCredentials, TlsFiles, profile_dir, write_profile

    if insecure and not _loopback(listen):
        raise click.UsageError("--insecure is for a loopback --listen address only")
    tmp = tempfile.TemporaryDirectory(prefix="hotwire-up-") if data_dir is None else None
    data = data_dir or (tmp.name if tmp else "hotwire-data")
    exe = [sys.executable, "-m", "hotwire.cli"]
    creds = ClientCredentials()
    worker_tls: list[str] = []
    profile = None
    if not insecure:
        tdir = tls_dir(data)
        if (tdir / "ca.pem").exists():
            token = _run(lambda: (tdir / "admin.token").read_text().strip())
        else:
            token = _run(lambda: bootstrap(data)).token
        for i in range(n_workers):
            if not (tdir / "workers" / f"w{i + 1}.pem").exists():
                _run(lambda i=i: pki.issue(tdir, "worker", f"w{i + 1}", tdir / "workers"))
        files = TlsFiles.of(tdir / "ca.pem", tdir / "admin.pem", tdir / "admin.key")
        creds = ClientCredentials(files, token)
        profile = write_profile(listen, files.ca, files.cert, files.key, token)
        worker_tls = ["--ca", str(files.ca)]
    procs: list[subprocess.Popen[bytes]] = []
    pumps: list[Any] = []

    def spawn(label: str, args: list[str]) -> None:
        import threading

        p = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(p)

        def pump() -> None:
            assert p.stdout is not None
            for line in iter(p.stdout.readline, b""):
                text = line.decode(errors="replace").rstrip()
                click.echo(f"[{label}] {text}")

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        pumps.append(t)

    def stop_all() -> None:
        # A second Ctrl-C must not interrupt the stop half-way (and print a traceback).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:  # print the processes' last lines before exiting
            t.join(2)
        if tmp is not None:
            tmp.cleanup()
            # The cluster's CA is gone with it: so is the profile that pointed at it.
            import shutil

            shutil.rmtree(profile_dir(listen), ignore_errors=True)

    def body() -> None:
        spawn(
            "master",
            [
                *exe,
                "master",
                "--listen",
                listen,
                "--data-dir",
                data,
                "--log-level",
                "warning",
                *(["--insecure"] if insecure else []),
            ],
        )
        _wait_for_master(listen, 20, creds)
        for i in range(n_workers):
            name = f"w{i + 1}"
            certs: list[str] = []
            if worker_tls:
                wdir = tls_dir(data) / "workers"
                certs = ["--worker-cert", str(wdir / f"{name}.pem")]
                certs += ["--worker-key", str(wdir / f"{name}.key")]
            spawn(
                name,
                [
                    *exe,
                    "--master",
                    listen,
                    *worker_tls,
                    "worker",
                    "--no-drain",
                    "--name",
                    name,
                    "--slots",
                    str(slots),
                    "--log-level",
                    "warning",
                    *certs,
                ],
            )
        _wait_for_workers(listen, n_workers, 20, creds)
        how = "plaintext (--insecure)" if insecure else "mTLS, tokens"
        click.echo(f"local cluster up: master {listen} ({how}), {n_workers} workers")
        if creds.tls is not None:
            click.echo(
                f"streamctl in this user's shells reaches it with no flags (profile in "
                f"{profile}); elsewhere:\n"
                f"  export HOTWIRE_MASTER={listen} HOTWIRE_CA={creds.tls.ca} "
                f"HOTWIRE_CERT={creds.tls.cert} HOTWIRE_KEY={creds.tls.key} "
                f"HOTWIRE_TOKEN=$(cat {tls_dir(data) / 'admin.token'})"
            )
        else:
            click.echo(f"  export HOTWIRE_MASTER={listen}")
        if app:
            from hotwire.client import Client

            r = Client(listen, creds).submit(app, timeout=60)
            click.echo(f"submitted app {r.app!r} version {r.version} ({r.instances} instances)")
        click.echo("Ctrl-C stops the cluster")
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        raise Failure("a cluster process exited; stopping the cluster")

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C stops the cluster even when started with SIGINT ignored (a background job of a
    # script); a script's `kill` (SIGTERM) stops it the same way.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        _run(body)
    except KeyboardInterrupt:
        click.echo("stopping the local cluster")
    finally:
        stop_all()
    click.echo("local cluster stopped")


def _loopback(addr: str) -> bool:
    from hotwire.security.tls import is_loopback

    return is_loopback(addr)


def _wait_for_master(addr: str, timeout: float, creds: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hotwire.security.tls import ClientCredentials, dial

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with dial(addr, ClientCredentials(creds.tls), []) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise Failure(f"the master at {addr} did not come up within {timeout:.0f}s")


def _wait_for_workers(addr: str, n: int, timeout: float, creds: Any) -> None:
    from hotwire.client import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Client(addr, creds) as c:
                r = c.workers(timeout=2)
            if sum(w.alive for w in r.workers) >= n:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise Failure(f"{n} workers did not register within {timeout:.0f}s")


# ---------------------------------------------------------------------------
# Apps
# ---------------------------------------------------------------------------


@main.command()
@click.argument("app", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default="", help="deploy under this name")
@click.option(
    "--include",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="a directory shipped with the app",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def submit(ctx: click.Context, app: str, name: str, include: str | None, as_json: bool) -> None:
    """Deploy an app; prints its name and version."""

    def body() -> None:
        r = _client(ctx.obj["master"]).submit(app, name=name, include=include)
        doc = {
            "app": r.app,
            "version": r.version,
            "instances": r.instances,
            "latency_ms": round(r.latency_ms, 3),
        }
        _emit(
            as_json,
            doc,
            lambda: click.echo(
                f"app {r.app!r} version {r.version} running ({r.instances} instances, "
                f"{r.latency_ms:.1f} ms)"
            ),
        )

    _run(body)


def _show_phases(as_json: bool, dry_run: bool) -> bool:
    """Whether an upgrade or rollback shows its phases as they pass: on a terminal
    (stderr), unless it is a dry run or the output is JSON."""
    return not as_json and not dry_run and sys.stderr.isatty()


def _print_upgrade(r: Any, as_json: bool, dry_run: bool) -> None:
    changes = json.loads(r.changes_json) if r.changes_json else {}
    from hotwire.master.diff import CHANGE_KEYS as keys

    doc = {
        "app": r.app,
        "from_version": r.from_version,
        "to_version": r.to_version,
        "changes": {k: changes.get(k, []) for k in (*keys, "pes_renamed", "renames_inferred")},
        "state": json.loads(r.state_json or "[]"),
        "handed_over": json.loads(r.handover_json or "[]"),
        "instructions": r.instructions,
        "applied": r.applied,
        "latency_ms": round(r.latency_ms, 3),
        "plan": list(r.plan_lines),
        "dry_run": dry_run,
        "state_check": r.state_check,
        "state_check_failed": r.state_check_failed,
    }

    def human() -> None:
        if not r.change_lines:
            click.echo(f"app {r.app!r} version {r.from_version}: no changes, nothing to apply")
            return
        click.echo(f"app {r.app!r}: version {r.from_version} -> {r.to_version}")
        for line in r.change_lines:
            click.echo(f"  {line}")
        click.echo(f"plan: {r.instructions} instructions")
        for line in r.plan_lines:
            click.echo(f"  {line}")
        if r.state_lines:
            click.echo("state:")
            for line in r.state_lines:
                click.echo(f"  {line}")
        if r.state_check:
            click.echo(f"state check: {r.state_check}")
        for h in doc["handed_over"]:
            click.echo(f"handed over: {_describe_handed(h)}")
        if r.applied:
            click.echo(f"version {r.to_version} is live ({r.latency_ms:.1f} ms)")
        else:
            click.echo("dry run: nothing applied")

    _emit(as_json, doc, human)
    if r.state_check_failed:
        raise Failure(f"dry run: the upgrade would fail: {r.state_check}")


@main.command()
@click.argument("app", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default="", help="the running app's name, if not the model's")
@click.option("--include", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--dry-run", is_flag=True, help="print the change set and plan; apply nothing")
@click.option(
    "--drop-state",
    "drop_state",
    multiple=True,
    metavar="PE",
    help="let the upgrade remove this stateful PE and drop its state (repeatable)",
)
@click.option(
    "--canary",
    default="",
    metavar="PE=SHARE",
    help="run the new code of PE (the upgrade's only change) on SHARE of its keys, e.g. count=10%",
)
@click.option(
    "--canary-errors",
    default=-1.0,
    type=float,
    metavar="RATE",
    help="roll the canary back when its error rate (errors/records) exceeds RATE",
)
@click.option(
    "--canary-for",
    default=0.0,
    type=click.FloatRange(min=0),
    metavar="S",
    help="promote the canary after S seconds within --canary-errors (default: by hand)",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def upgrade(
    ctx: click.Context,
    app: str,
    name: str,
    include: str | None,
    dry_run: bool,
    drop_state: tuple[str, ...],
    canary: str,
    canary_errors: float,
    canary_for: float,
    as_json: bool,
) -> None:
    """Diff APP against the running version and apply the change online."""

    def body() -> None:
        client = _client(ctx.obj["master"])
        watcher: list[Any] = []  # the phases on a terminal (stderr), once the app is known

        def loaded(app_name: str) -> None:
            if _show_phases(as_json, dry_run):
                from hotwire.watch import PhaseWatcher

                watcher.append(PhaseWatcher(client, app_name, sys.stderr).start())

        try:
            r = client.upgrade(
                app,
                name=name,
                include=include,
                dry_run=dry_run,
                drop_state=drop_state,
                canary=canary,
                canary_errors=canary_errors,
                canary_for=canary_for,
                loaded=loaded,
            )
        finally:
            for w in watcher:
                w.stop()
        if r.canary and not as_json:
            _print_upgrade(r, as_json, dry_run=True)
            auto = f", promoted after {canary_for:g} s" if canary_for else ""
            limit = (
                f" unless its error rate exceeds {canary_errors:g}" if canary_errors >= 0 else ""
            )
            click.echo(
                f"canary {canary} is live ({r.latency_ms:.1f} ms){auto}{limit}; "
                f"'streamctl canary promote|abort {r.app}' ends it"
            )
            return
        _print_upgrade(r, as_json, dry_run)

    _run(body)


@main.command()
@click.argument("name")
@click.option(
    "--to",
    "to_version",
    default=0,
    type=click.IntRange(min=0),
    help="version to go back to (default: the one before the current)",
)
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollback(ctx: click.Context, name: str, to_version: int, dry_run: bool, as_json: bool) -> None:
    """Upgrade back to an earlier version, online."""

    def body() -> None:
        client = _client(ctx.obj["master"])
        watcher = None
        if _show_phases(as_json, dry_run):
            from hotwire.watch import PhaseWatcher

            watcher = PhaseWatcher(client, name, sys.stderr).start()
        try:
            r = client.rollback(name, to_version=to_version, dry_run=dry_run)
        finally:
            if watcher is not None:
                watcher.stop()
        _print_upgrade(r, as_json, dry_run)

    _run(body)


@main.command()
@click.argument("name", required=False, default="")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, name: str, as_json: bool) -> None:
    """Versions, PEs, instances and their workers, per-PE rates, errors and time blocked
    on credit (backpressure), and the age of the last checkpoint."""

    def body() -> None:
        r = _client(ctx.obj["master"]).status(name)
        apps = [
            {
                "app": a.app,
                "version": a.version,
                "state": a.state,
                "last_checkpoint": a.last_checkpoint,
                "checkpoint_age_s": round(a.checkpoint_age_s, 1)
                if a.checkpoint_age_s >= 0
                else None,
                "recoveries": a.recoveries,
                "last_recovery": a.last_recovery,
                "canary": json.loads(a.canary_json) if a.canary_json else None,
                "pes": [
                    {
                        "name": p.name,
                        "kind": p.kind,
                        "parallelism": p.parallelism,
                        "gen": p.gen,
                        "canary_percent": p.canary_share / 100 if p.canary_share else None,
                        "rate": round(sum(i.rate_in for i in p.instances), 1),
                        "errors": sum(i.errors for i in p.instances),
                        "late_dropped": sum(i.late_dropped for i in p.instances),
                        "blocked": round(max((i.blocked for i in p.instances), default=0.0), 3),
                        "chained": _share(
                            sum(i.chained for i in p.instances), sum(i.batches for i in p.instances)
                        ),
                        "failed": p.failed,
                        "instances": [
                            {
                                "index": i.index,
                                "worker": i.worker,
                                "records_in": i.records_in,
                                "records_out": i.records_out,
                                "rate": round(i.rate_in, 1),
                                "errors": i.errors,
                                "failed": i.failed,
                                "error": i.error,
                                "dead_letters": i.dead_letters,
                                "late_dropped": i.late_dropped,
                                "version": i.version,
                                "process_ms": round(i.process_ms, 3),
                                "waiting": i.waiting,
                                "waiting_s": round(i.waiting_s, 1),
                                "queued": i.queued,
                                "blocked": round(i.blocked, 3),
                                "batches": i.batches,
                                "chained": i.chained,
                            }
                            for i in p.instances
                        ],
                    }
                    for p in a.pes
                ],
            }
            for a in r.apps
        ]

        def human() -> None:
            if not apps:
                click.echo("no apps")
            for a in apps:
                age = a["checkpoint_age_s"]
                checkpoint = (
                    f"last checkpoint {age:.1f} s ago"
                    if age is not None
                    else "no checkpoint since the master started"
                )
                click.echo(f"app {a['app']!r} version {a['version']} {a['state']}, {checkpoint}")
                if a["last_recovery"]:
                    click.echo(
                        f"  restarted from a checkpoint {a['recoveries']} time(s); "
                        f"last: {a['last_recovery']}"
                    )
                if c := a["canary"]:
                    click.echo(_describe_canary(c))
                    for k, v in c["stats"].items():
                        ver = c["to_version"] if k == "canary" else c["from_version"]
                        click.echo(
                            f"    v{ver} ({k}): {v['instances']} instance(s), "
                            f"{v['records_in']} in, {v['records_out']} out, "
                            f"{v['errors']} errors (rate {v.get('error_rate', 0.0):.3f}), "
                            f"{v.get('ms_per_record', 0.0):.3f} ms/record in the PE's code"
                        )
                for p in a["pes"]:
                    where = ", ".join(
                        f"{i['index']}@{i['worker']}"
                        + (f" v{i['version']}" if p["canary_percent"] else "")
                        for i in p["instances"]
                    )
                    notes = "".join(
                        (
                            f"  {p['errors']} errors" if p["errors"] else "",
                            f"  {p['late_dropped']} late dropped" if p["late_dropped"] else "",
                            f"  blocked {p['blocked']:.0%}" if p["blocked"] >= 0.01 else "",
                            f"  chained {p['chained']:.0%}" if p["chained"] else "",
                        )
                    )
                    click.echo(
                        f"  {p['name']:<16} {p['kind']:<8} x{p['parallelism']:<3} "
                        f"{p['rate']:>10.1f} rec/s  [{where}]{notes}"
                    )
                    for i in p["instances"]:
                        if i["failed"]:
                            click.echo(
                                f"    FAILED instance {i['index']}@{i['worker']}: {i['error']}"
                            )
                        if i["waiting"]:
                            click.echo(
                                f"    instance {i['index']}@{i['worker']} waiting: "
                                f"{i['waiting']} since {i['waiting_s']:.1f} s "
                                f"({i['queued']} records queued)"
                            )

        _emit(as_json, apps[0] if name and apps else {"apps": apps}, human)

    _run(body)


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, name: str, as_json: bool) -> None:
    """Every version of an app, when, and what changed."""

    def body() -> None:
        r = _client(ctx.obj["master"]).history(name)
        versions = [
            {
                "version": v.version,
                "created": v.created_unix,
                "action": v.action,
                "changes": json.loads(v.changes_json or "{}"),
                "latency_ms": round(v.latency_ms, 3),
                **({"rolled_back_to": v.rolled_back_to} if v.rolled_back_to else {}),
            }
            for v in r.versions
        ]

        def human() -> None:
            from hotwire.master.diff import ChangeSet

            for v in versions:
                when = datetime.fromtimestamp(v["created"]).strftime("%Y-%m-%d %H:%M:%S")
                mark = "*" if v["version"] == r.current else " "
                extra = f" to {v['rolled_back_to']}" if v.get("rolled_back_to") else ""
                click.echo(
                    f"{mark} v{v['version']:<4} {when}  {v['action']}{extra} "
                    f"({v['latency_ms']:.1f} ms)"
                )
                if v["action"] != "submit":
                    for line in ChangeSet.from_dict(v["changes"]).describe():
                        click.echo(f"        {line}")
                if plan := v["changes"].get("plan"):
                    kinds = ", ".join(f"{n} {t}" for t, n in plan.get("by_type", {}).items())
                    click.echo(
                        f"        plan: {plan['instructions']} instructions on "
                        f"{plan.get('workers', 0)} worker(s)" + (f" ({kinds})" if kinds else "")
                    )
                for move in v["changes"].get("state", []):
                    click.echo(f"        state: {_describe_move(move)}")
                for h in v["changes"].get("handed_over", []):
                    click.echo(f"        handed over: {_describe_handed(h)}")
                if c := v["changes"].get("canary"):
                    click.echo(f"        after {_describe_canary(c)}")
            for c in canaries:
                if c["outcome"] != "promoted":  # a promoted one shows with its version
                    click.echo(f"  {_describe_canary(c)}")

        canaries = json.loads(r.canaries_json or "[]")
        doc = {"app": r.app, "current": r.current, "versions": versions, "canaries": canaries}
        _emit(as_json, doc, human)

    _run(body)


def _share(part: int, whole: int) -> float | None:
    """``part / whole`` to 3 places, or None when ``whole`` is 0 (nothing to share)."""
    return round(part / whole, 3) if whole else None


def _describe_canary(c: dict[str, Any]) -> str:
    """A canary (``CanaryRun.to_dict``) in one line."""
    when = datetime.fromtimestamp(c["started_unix"]).strftime("%Y-%m-%d %H:%M:%S")
    line = (
        f"canary of {c['pe']!r} on {c['share_percent']:g}% of its keys, "
        f"v{c['from_version']} -> v{c['to_version']}, from {when}: {c['outcome']}"
    )
    return line + (f" ({c['why']})" if c.get("why") else "")


@main.group()
def canary() -> None:
    """End a canary started with 'streamctl upgrade APP --canary PE=SHARE'."""


@canary.command("promote")
@click.argument("name")
@click.pass_context
def canary_promote(ctx: click.Context, name: str) -> None:
    """Upgrade to the canary's version: every key moves to the new code, with its state."""
    _canary_action(ctx, name, "promote")


@canary.command("abort")
@click.argument("name")
@click.pass_context
def canary_abort(ctx: click.Context, name: str) -> None:
    """Move the canary's keys back to the running code, with their state."""
    _canary_action(ctx, name, "abort")


def _canary_action(ctx: click.Context, name: str, action: str) -> None:
    def body() -> None:
        r = _client(ctx.obj["master"]).canary(name, action)
        done = "promoted" if action == "promote" else "aborted"
        click.echo(
            f"canary of {r.pe!r} {done}: app {r.app!r} runs version {r.version} "
            f"({r.latency_ms:.1f} ms)"
        )

    _run(body)


def _describe_handed(h: dict[str, Any]) -> str:
    """What one PE's retiring instances handed over in a switch, as the workers
    counted it (``handover_json``), in one line."""
    held = f", {h['held']} held record(s)" if h.get("held") else ""
    return (
        f"{h['pe']!r}: {h['keys']} keys, {h['bytes']} bytes in {h['handovers']} "
        f"handover(s) ({h['local']} on the same worker){held}"
    )


def _describe_move(m: dict[str, Any]) -> str:
    """A version's recorded state move (``StateMove.to_dict``) in one line."""
    size = "size unknown" if m.get("bytes") is None else f"{m['bytes']} bytes"
    what = f"{m['from']!r} ({m['from_instances']} instance(s), {size})"
    if not m.get("to"):
        return f"{what} dropped"
    return f"{what} -> {m['to']!r} ({m['to_instances']} instance(s)), {m['split']}"


@main.command("diff")
@click.argument("name")
@click.argument("v1", type=click.IntRange(min=1))
@click.argument("v2", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def diff_versions(ctx: click.Context, name: str, v1: int, v2: int, as_json: bool) -> None:
    """The change set from stored version V1 of an app to V2 (any two versions)."""

    def body() -> None:
        r = _client(ctx.obj["master"]).diff(name, v1, v2)
        changes = json.loads(r.changes_json or "{}")
        doc = {
            "app": r.app,
            "from_version": r.from_version,
            "to_version": r.to_version,
            "changes": changes,
            "lines": list(r.change_lines),
        }

        def human() -> None:
            click.echo(f"app {r.app!r}: version {r.from_version} -> {r.to_version}")
            if not r.change_lines:
                click.echo("  no changes")
            for line in r.change_lines:
                click.echo(f"  {line}")

        _emit(as_json, doc, human)

    _run(body)


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def kill(ctx: click.Context, name: str, as_json: bool) -> None:
    """Stop an app."""

    def body() -> None:
        r = _client(ctx.obj["master"]).kill(name)
        _emit(
            as_json,
            {"app": r.app, "version": r.version, "killed": True},
            lambda: click.echo(f"app {r.app!r} (version {r.version}) stopped"),
        )

    _run(body)


# Data-plane counters that are not drops: a link reconnecting and resending is normal.
_LINK_STATS = frozenset({"reconnects", "resent", "duplicates"})


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def workers(ctx: click.Context, as_json: bool) -> None:
    """Registered workers, liveness, slots, PE instances."""

    def body() -> None:
        r = _client(ctx.obj["master"]).workers()
        ws = [
            {
                "name": w.name,
                "address": w.data_address,
                "alive": w.alive,
                "slots": w.slots,
                "last_heartbeat_s": round(w.last_heartbeat_age_s, 2),
                "instances": list(w.instances),
                "session": w.epoch,
                "fenced": w.fenced,
                "data_plane": dict(sorted(w.data_plane.items())),
            }
            for w in r.workers
        ]

        def human() -> None:
            if not ws:
                click.echo("no workers")
            for w in ws:
                state = "fenced" if w["fenced"] else "alive" if w["alive"] else "dead"
                click.echo(
                    f"{w['name']:<12} {w['address']:<22} {state:<6} "
                    f"{len(w['instances'])}/{w['slots']} slots, session {w['session']}"
                )
                counts = {k: v for k, v in w["data_plane"].items() if k not in _LINK_STATS}
                if counts:  # something was dropped or refused: never silent
                    shown = ", ".join(f"{k} {v}" for k, v in counts.items())
                    click.echo(f"{'':<12} data plane dropped/refused: {shown}")

        _emit(as_json, {"workers": ws}, human)

    _run(body)


# ---------------------------------------------------------------------------
# Security: the cluster CA, certificates, tokens, the audit log
# ---------------------------------------------------------------------------


@main.command()
@click.option(
    "--data-dir",
    default="hotwire-data",
    show_default=True,
    type=click.Path(),
    help="the master's data directory: the CA and certificates go to DATA_DIR/tls",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME|IP",
    help="another name or address of the master for its certificate (repeatable)",
)
@click.option(
    "--profile",
    "profile_for",
    default=None,
    metavar="HOST:PORT",
    help="also write the client profile for the master at this address",
)
def init(data_dir: str, hosts: tuple[str, ...], profile_for: str | None) -> None:
    """Make a cluster CA, the master's certificate and a first admin token.

    Writes DATA_DIR/tls/{ca.pem,ca.key,master.pem,master.key,admin.pem,admin.key,
    admin.token} (keys and token mode 0600). A master started with this --data-dir
    then runs mTLS and requires tokens. Keep ca.key offline if you can: only
    `streamctl cert` needs it.
    """
    from hotwire.master.access import bootstrap
    from hotwire.security.tls import write_profile

    def body() -> None:
        b = bootstrap(data_dir, hosts)
        click.echo(f"cluster CA and master certificate in {b.tls_dir}")
        click.echo(f"admin token {b.token_id} (in {b.tls_dir / 'admin.token'}): {b.token}")
        if profile_for:
            d = write_profile(profile_for, b.ca, b.client_cert, b.client_key, b.token)
            click.echo(f"profile for {profile_for} in {d}")
        click.echo(
            f"clients: export HOTWIRE_CA={b.ca} HOTWIRE_CERT={b.client_cert} "
            f"HOTWIRE_KEY={b.client_key} HOTWIRE_TOKEN=$(cat {b.tls_dir / 'admin.token'})"
        )

    _run(body)


@main.command()
@click.argument("kind", type=click.Choice(["worker", "client"]))
@click.argument("name")
@click.option(
    "--data-dir",
    default="hotwire-data",
    show_default=True,
    type=click.Path(),
    help="the master's data directory holding the CA (DATA_DIR/tls)",
)
@click.option(
    "--out", default=None, type=click.Path(file_okay=False), help="where to write (default: .)"
)
@click.option("--host", "hosts", multiple=True, metavar="NAME|IP", help="extra SAN (repeatable)")
def cert(kind: str, name: str, data_dir: str, out: str | None, hosts: tuple[str, ...]) -> None:
    """Issue a certificate from the cluster CA: KIND worker (NAME is the worker's name,
    the only one it can register under) or client.

    Writes NAME.pem and NAME.key (0600) to --out.
    """
    from hotwire.master.access import tls_dir
    from hotwire.security import pki

    def body() -> None:
        issued = pki.issue(tls_dir(data_dir), kind, name, out or ".", hosts)
        click.echo(f"{kind} certificate for {name!r}: {issued.cert}, key {issued.key}")

    _run(body)


@main.group()
def token() -> None:
    """Create, list and revoke the master's client tokens (roles: admin, viewer)."""


@token.command("create")
@click.option("--role", type=click.Choice(["admin", "viewer"]), required=True)
@click.option("--label", default="", help="who or what it is for")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_create(ctx: click.Context, role: str, label: str, as_json: bool) -> None:
    """Make a token; it is printed once (the master keeps only its digest)."""

    def body() -> None:
        r = _client(ctx.find_root().obj["master"]).create_token(role, label)
        doc = {"id": r.id, "role": r.role, "token": r.token}
        _emit(as_json, doc, lambda: click.echo(f"token {r.id} ({r.role}): {r.token}"))

    _run(body)


@token.command("revoke")
@click.argument("token_id")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke a token by its id: every later call with it is refused."""

    def body() -> None:
        r = _client(ctx.find_root().obj["master"]).revoke_token(token_id)
        click.echo(f"token {r.id} revoked")

    _run(body)


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_list(ctx: click.Context, as_json: bool) -> None:
    """The master's tokens (ids, roles, labels; never the tokens themselves)."""

    def body() -> None:
        r = _client(ctx.find_root().obj["master"]).tokens()
        docs = [
            {
                "id": t.id,
                "role": t.role,
                "label": t.label,
                "created": t.created_unix,
                "revoked": t.revoked_unix or None,
            }
            for t in r.tokens
        ]

        def human() -> None:
            for d in docs:
                state = "revoked" if d["revoked"] else "valid"
                click.echo(f"{d['id']:<10} {d['role']:<7} {state:<8} {d['label']}")

        _emit(as_json, {"tokens": docs}, human)

    _run(body)


@main.command()
@click.argument("app", required=False, default="")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit(ctx: click.Context, app: str, limit: int, as_json: bool) -> None:
    """The master's audit log: every mutating request, allowed or refused, newest last."""

    def body() -> None:
        from hotwire.proto import hotwire_pb2 as pb

        r = _client(ctx.obj["master"]).audit(app, limit)
        fields = [f.name for f in pb.AuditEntry.DESCRIPTOR.fields]
        docs = [{f: getattr(e, f) for f in fields} for e in r.entries]

        def human() -> None:
            for d in docs:
                when = datetime.fromtimestamp(d["at_unix"]).strftime("%Y-%m-%d %H:%M:%S")
                versions = f" v{d['from_version']}->v{d['to_version']}" if d["to_version"] else ""
                click.echo(
                    f"{when} {d['token'] or '-':<9} {d['command']:<11} {d['app'] or '-'}"
                    f"{versions} {d['outcome']}{': ' + d['detail'] if d['detail'] else ''}"
                )

        _emit(as_json, {"entries": docs}, human)

    _run(body)


def _add_jobs() -> None:
    try:
        from hotwire.jobs.cli import jobs
    except ImportError:  # the jobs part is optional at import time
        return
    main.add_command(jobs)


def _add_deploy() -> None:
    from hotwire.deploy.cli import deploy, health

    main.add_command(deploy)
    main.add_command(health)


_add_jobs()
_add_deploy()
_accept_master_after(main)

if __name__ == "__main__":
    main()


__all__ = ["main"]
