"""A small synchronous client for the master's API (used by streamctl, tests and benchmarks)."""

from __future__ import annotations

from typing import Any

import grpc

from hotwire.node import grpc_options
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc


def load(app_path: str, include: str | None = None) -> tuple[Any, Any]:
    """Run an app file on the client: its validated logical model and its bundle."""
    from hotwire.sdk.bundle import load_app, make_bundle

    model = load_app(app_path).model()
    return model, make_bundle(app_path, include=include)


class Client:
    def __init__(self, master: str):
        self.master = master
        self.channel = grpc.insecure_channel(master, options=grpc_options())
        self.stub = pb_grpc.MasterStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self, app_path: str, name: str = "", include: str | None = None, timeout: float = 120
    ) -> pb.SubmitReply:
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
    ) -> pb.UpgradeReply:
        model, bundle = load(app_path, include)
        return self.stub.Upgrade(
            pb.UpgradeRequest(
                model_json=model.to_json(),
                bundle=bundle.data,
                bundle_hash=bundle.hash,
                name=name,
                dry_run=dry_run,
            ),
            timeout=timeout,
        )

    def rollback(
        self, app: str, to_version: int = 0, dry_run: bool = False, timeout: float = 180
    ) -> pb.UpgradeReply:
        return self.stub.Rollback(
            pb.RollbackRequest(app=app, to_version=to_version, dry_run=dry_run), timeout=timeout
        )

    def status(self, app: str = "", timeout: float = 10) -> pb.StatusReply:
        return self.stub.Status(pb.StatusRequest(app=app), timeout=timeout)

    def history(self, app: str, timeout: float = 10) -> pb.HistoryReply:
        return self.stub.History(pb.HistoryRequest(app=app), timeout=timeout)

    def kill(self, app: str, timeout: float = 60) -> pb.KillReply:
        return self.stub.Kill(pb.KillRequest(app=app), timeout=timeout)

    def workers(self, timeout: float = 10) -> pb.ListWorkersReply:
        return self.stub.ListWorkers(pb.ListWorkersRequest(), timeout=timeout)
