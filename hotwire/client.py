"""A small synchronous client for the master's API (used by streamctl, tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hotwire.names import name_problem, shown
from hotwire.node import grpc_options
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc
from hotwire.security.tls import ClientCredentials, client_credentials, dial


def check_app_name(name: str) -> None:
    """Refuse an app name the master would refuse (``""``: the model's own name)."""
    from hotwire.sdk.errors import ValidationError

    if name and (bad := name_problem(name, f"app {shown(name)}")):
        raise ValidationError([bad])


def load(app_path: str, include: str | None = None) -> tuple[Any, Any]:
    """Run an app file on the client: its validated logical model and its bundle."""
    from hotwire.sdk.bundle import load_app, make_bundle

    model = load_app(app_path).model()
    return model, make_bundle(app_path, include=include)


class Client:
    """Calls the master at ``master`` with ``creds`` (default: found by
    :func:`hotwire.security.tls.client_credentials`: the ``HOTWIRE_*`` variables,
    else the profile ``streamctl up``/``init`` wrote for that address, else plaintext)."""

    def __init__(self, master: str, creds: ClientCredentials | None = None):
        self.master = master
        self.creds = creds if creds is not None else client_credentials(master)
        self.channel = dial(master, self.creds, grpc_options())
        self.stub = pb_grpc.MasterStub(self.channel)
        self.access = pb_grpc.AccessStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self, app_path: str, name: str = "", include: str | None = None, timeout: float = 120
    ) -> pb.SubmitReply:
        check_app_name(name)
        model, bundle = load(app_path, include)
        return self.stub.Submit(
            pb.SubmitRequest(
                model_json=model.to_json(), bundle=bundle.data, bundle_hash=bundle.hash, name=name
            ),
            timeout=timeout,
        )

    def upgrade(
        self,
        app_path: str,
        name: str = "",
        include: str | None = None,
        dry_run: bool = False,
        timeout: float = 180,
        drop_state: tuple[str, ...] | list[str] = (),
        canary: str = "",
        canary_errors: float = -1.0,
        canary_for: float = 0.0,
        loaded: Callable[[str], None] | None = None,
    ) -> pb.UpgradeReply:
        """Upgrade online; with ``canary="PE=10%"``, start a canary of PE instead: its
        new code takes that share of the keys, and is promoted after ``canary_for``
        seconds (0: by hand) unless its error rate exceeds ``canary_errors`` (<0: no
        limit), which rolls it back. ``loaded(app)`` is called with the app's name
        once the file is loaded, before the request goes out."""
        check_app_name(name)
        from hotwire.master.canary import parse_share

        pe, share = parse_share(canary) if canary else ("", 0)
        model, bundle = load(app_path, include)
        if loaded is not None:
            loaded(name or model.app)
        return self.stub.Upgrade(
            pb.UpgradeRequest(
                model_json=model.to_json(),
                bundle=bundle.data,
                bundle_hash=bundle.hash,
                name=name,
                dry_run=dry_run,
                drop_state=list(drop_state),
                canary_pe=pe,
                canary_share=share,
                canary_errors=canary_errors,
                canary_for=canary_for,
            ),
            timeout=timeout,
        )

    def rollback(
        self, app: str, to_version: int = 0, dry_run: bool = False, timeout: float = 180
    ) -> pb.UpgradeReply:
        check_app_name(app)
        return self.stub.Rollback(
            pb.RollbackRequest(app=app, to_version=to_version, dry_run=dry_run), timeout=timeout
        )

    def canary(self, app: str, action: str, timeout: float = 180) -> pb.CanaryReply:
        """``promote`` or ``abort`` the canary of ``app``."""
        check_app_name(app)
        return self.stub.Canary(pb.CanaryRequest(app=app, action=action), timeout=timeout)

    def status(self, app: str = "", timeout: float = 10) -> pb.StatusReply:
        return self.stub.Status(pb.StatusRequest(app=app), timeout=timeout)

    def history(self, app: str, timeout: float = 10) -> pb.HistoryReply:
        return self.stub.History(pb.HistoryRequest(app=app), timeout=timeout)

    def diff(self, app: str, v1: int, v2: int, timeout: float = 10) -> pb.DiffReply:
        """The change set from stored version ``v1`` of ``app`` to version ``v2``."""
        check_app_name(app)
        return self.stub.Diff(
            pb.DiffRequest(app=app, from_version=v1, to_version=v2), timeout=timeout
        )

    def kill(self, app: str, timeout: float = 60) -> pb.KillReply:
        return self.stub.Kill(pb.KillRequest(app=app), timeout=timeout)

    def workers(self, timeout: float = 10) -> pb.ListWorkersReply:
        return self.stub.ListWorkers(pb.ListWorkersRequest(), timeout=timeout)

    # -- access control (a master with TLS) --------------------------------
    def create_token(self, role: str, label: str = "", timeout: float = 10) -> pb.CreateTokenReply:
        return self.access.CreateToken(
            pb.CreateTokenRequest(role=role, label=label), timeout=timeout
        )

    def revoke_token(self, token_id: str, timeout: float = 10) -> pb.RevokeTokenReply:
        return self.access.RevokeToken(pb.RevokeTokenRequest(id=token_id), timeout=timeout)

    def tokens(self, timeout: float = 10) -> pb.ListTokensReply:
        return self.access.ListTokens(pb.ListTokensRequest(), timeout=timeout)

    def audit(self, app: str = "", limit: int = 100, timeout: float = 10) -> pb.AuditReply:
        return self.access.Audit(pb.AuditRequest(app=app, limit=limit), timeout=timeout)
