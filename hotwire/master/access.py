"""Who may call the master: certificates for workers, tokens with roles for clients,
and the audit log of every mutating request.

With TLS on (the master has a certificate), every connection already carries a
client certificate from the cluster CA; this module adds, per call:

- on the worker service, that the certificate is a *worker* certificate and that
  the name the worker registers or heartbeats under is the name in it;
- on the client services (``Master`` and ``Access``), a bearer token from the
  ``authorization`` metadata, unrevoked, whose role allows the method (a viewer
  may only dry-run an upgrade or a rollback).

A refused call ends with UNAUTHENTICATED or PERMISSION_DENIED before it reaches
the service: nothing of an app is touched. Every mutating call, allowed or not,
is written to the audit log in the master's store with its outcome.

Everything is done in one gRPC server interceptor, so the services themselves
carry no access checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hotwire.master.store import Store
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc
from hotwire.security import pki, tokens
from hotwire.security.tls import TlsFiles, grpc_peer

log = logging.getLogger(__name__)

CLIENT_SERVICES = ("/hotwire.v1.Master/", "/hotwire.v1.Access/")
WORKER_SERVICE = "/hotwire.v1.WorkerControl/"
# Worker calls whose request names the worker: the name must be the certificate's.
NAMED_WORKER_CALLS = frozenset({"Register", "Heartbeat", "Drain"})


@dataclass(frozen=True)
class Token:
    id: str
    digest: str
    role: str
    label: str
    created: float
    revoked: float


@dataclass(frozen=True)
class Caller:
    token: str  # the token's id
    role: str
    peer: str  # the name in the client certificate


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code


# The audit entry's fields, in the order of the store's audit columns (Store.audit).
AUDIT_FIELDS = tuple(f.name for f in pb.AuditEntry.DESCRIPTOR.fields)


class Access:
    """The master's tokens (digests, cached from its store) and its audit log."""

    def __init__(self, store: Store):
        self.store = store
        self.tokens: dict[str, Token] = {}
        self.refused: Counter[str] = Counter()  # refusals by status code name

    async def load(self) -> None:
        rows = await self.store.read(self.store.tokens)
        self.tokens = {r[0]: Token(*r) for r in rows}

    async def create(self, role: str, label: str) -> tuple[str, str]:
        if role not in tokens.ROLES:
            raise Denied(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown role {role!r} (one of {', '.join(tokens.ROLES)})",
            )
        if len(label) > 200:
            raise Denied(grpc.StatusCode.INVALID_ARGUMENT, "a token label is at most 200 chars")
        tid, token = tokens.new_token()
        digest = tokens.digest(token)
        await asyncio.wrap_future(self.store.put_token(tid, digest, role, label))
        self.tokens[tid] = Token(tid, digest, role, label, time.time(), 0.0)
        return tid, token

    async def revoke(self, tid: str) -> None:
        t = self.tokens.get(tid)
        if t is None:
            raise Denied(grpc.StatusCode.NOT_FOUND, f"no token {tid!r}")
        if t.revoked:
            return
        await asyncio.wrap_future(self.store.revoke_token(tid))
        self.tokens[tid] = Token(t.id, t.digest, t.role, t.label, t.created, time.time())

    def authenticate(self, metadata: Any) -> Token:
        value = ""
        for k, v in metadata or ():
            if k == "authorization":
                value = v if isinstance(v, str) else v.decode(errors="replace")
        scheme, _, token = value.partition(" ")
        if not value:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "no token: give --token or HOTWIRE_TOKEN")
        if scheme.lower() != "bearer" or not token:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the authorization is not a bearer token")
        try:
            tid = tokens.token_id(token.strip())
        except tokens.TokenError:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the token is not valid") from None
        t = self.tokens.get(tid)
        if t is None or not tokens.matches(token.strip(), t.digest):
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the token is not valid")
        if t.revoked:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, f"token {tid} was revoked")
        return t

    def audit(
        self,
        caller: Caller,
        command: str,
        request: Any,
        reply: Any,
        outcome: str,
        detail: str,
    ) -> None:
        app = getattr(request, "app", "") or getattr(request, "name", "")
        if not app and reply is not None:
            app = getattr(reply, "app", "")
        from_v = int(getattr(reply, "from_version", 0) or 0) if reply is not None else 0
        to_v = 0
        if reply is not None:
            to_v = int(getattr(reply, "to_version", 0) or getattr(reply, "version", 0) or 0)
        if getattr(request, "dry_run", False):
            detail = f"dry run; {detail}" if detail else "dry run"
        row = (
            time.time(),
            caller.token,
            caller.role,
            caller.peer,
            command,
            str(app)[:200],
            from_v,
            to_v,
            outcome,
            detail[:500],
        )
        self.store.put_audit(row)


class Refusal(Exception):
    """A call refused before it reaches its service; ``audit`` records it (mutating calls)."""

    def __init__(
        self, code: grpc.StatusCode, reason: str, audit: Callable[..., None] | None = None
    ):
        super().__init__(reason)
        self.code = code
        self.audit = audit


Check = Callable[[Any, Any], tuple[Caller, Callable[..., None] | None]]


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call's credentials before the service sees it (see the module doc)."""

    def __init__(self, access: Access):
        self.access = access

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        name = method.rpartition("/")[2]
        if method.startswith(CLIENT_SERVICES):
            metadata = details.invocation_metadata  # type: ignore[attr-defined]
            return self._wrap(handler, self._client_check(name, metadata))
        if method.startswith(WORKER_SERVICE):
            return self._wrap(handler, self._worker_check(name))
        return handler  # the health service: open, it tells nothing

    def _client_check(self, method: str, metadata: Any) -> Check:
        access = self.access

        def check(request: Any, context: Any) -> tuple[Caller, Callable[..., None] | None]:
            peer = grpc_peer(context)
            caller = Caller("", "", peer[1] if peer else "")

            def audit(reply: Any, outcome: str, detail: str) -> None:
                access.audit(caller, method, request, reply, outcome, detail)

            recorded = audit if method in tokens.MUTATING else None
            try:
                t = access.authenticate(metadata)
            except Denied as e:
                raise Refusal(e.code, str(e), recorded) from None
            caller = Caller(t.id, t.role, caller.peer)
            if not tokens.allowed(t.role, method, bool(getattr(request, "dry_run", False))):
                only = " (only as a dry run)" if method in tokens.DRY_RUN_ONLY else ""
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"token {t.id} has role {t.role!r}, which may not call {method}{only}",
                    recorded,
                )
            return caller, recorded

        return check

    def _worker_check(self, method: str) -> Check:
        def check(request: Any, context: Any) -> tuple[Caller, None]:
            peer = grpc_peer(context)
            if peer is None or peer[0] != "worker":
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "only a worker certificate of this cluster may call the worker service",
                )
            if method in NAMED_WORKER_CALLS and request.name != peer[1]:
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the certificate is worker {peer[1]!r}'s: it cannot act as worker "
                    f"{request.name!r}",
                )
            return Caller("", "worker", peer[1]), None

        return check

    async def _refuse(self, context: Any, e: Refusal) -> None:
        self.access.refused[e.code.name] += 1
        log.warning("refused a call from %s: %s", context.peer(), e)
        if e.audit is not None:
            e.audit(None, e.code.name, str(e))
        await context.abort(e.code, str(e))

    def _wrap(self, handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                try:
                    _, audit = check(request, context)
                except Refusal as e:
                    await self._refuse(context, e)
                    raise  # not reached: abort raises
                if audit is None:
                    return await inner(request, context)
                try:
                    reply = await inner(request, context)
                except BaseException:
                    code = context.code()
                    outcome = code.name if isinstance(code, grpc.StatusCode) else "FAILED"
                    audit(None, outcome, context.details() or "")
                    raise
                audit(reply, "OK", _detail(reply))
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator: Any, context: Any) -> Any:
                try:
                    check(None, context)
                except Refusal as e:
                    await self._refuse(context, e)
                    raise
                return await inner_stream(request_iterator, context)

            return grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"no access check for this kind of method: {handler}")


def _detail(reply: Any) -> str:
    if isinstance(reply, pb.CreateTokenReply):
        return f"created token {reply.id} ({reply.role})"
    if isinstance(reply, pb.RevokeTokenReply):
        return f"revoked token {reply.id}"
    if isinstance(reply, pb.UpgradeReply) and not reply.applied:
        return "not applied"
    return ""


class AccessService(pb_grpc.AccessServicer):
    """Token management and the audit log (the interceptor checks the caller's role)."""

    def __init__(self, access: Access):
        self.access = access

    async def CreateToken(self, request: Any, context: Any) -> pb.CreateTokenReply:
        try:
            tid, token = await self.access.create(request.role, request.label)
        except Denied as e:
            await context.abort(e.code, str(e))
        return pb.CreateTokenReply(id=tid, token=token, role=request.role)

    async def RevokeToken(self, request: Any, context: Any) -> pb.RevokeTokenReply:
        try:
            await self.access.revoke(request.id)
        except Denied as e:
            await context.abort(e.code, str(e))
        return pb.RevokeTokenReply(id=request.id)

    async def ListTokens(self, request: Any, context: Any) -> pb.ListTokensReply:
        return pb.ListTokensReply(
            tokens=[
                pb.TokenInfo(
                    id=t.id,
                    role=t.role,
                    label=t.label,
                    created_unix=t.created,
                    revoked_unix=t.revoked,
                )
                for t in self.access.tokens.values()
            ]
        )

    async def Audit(self, request: Any, context: Any) -> pb.AuditReply:
        store = self.access.store
        await store.flush()
        limit = request.limit if request.limit > 0 else 100
        rows = await store.read(store.audit, request.app, min(limit, 10_000))
        return pb.AuditReply(
            entries=[pb.AuditEntry(**dict(zip(AUDIT_FIELDS, r, strict=True))) for r in rows]
        )


@dataclass(frozen=True)
class Bootstrap:
    """What :func:`bootstrap` made: the TLS directory, the admin's client files and token."""

    tls_dir: Path
    ca: Path
    client_cert: Path
    client_key: Path
    token_id: str
    token: str


def tls_dir(data_dir: str | Path) -> Path:
    """Where a master's CA and certificates live: ``<data-dir>/tls``."""
    return Path(data_dir) / "tls"


def master_tls(data_dir: str | Path) -> TlsFiles | None:
    """The master's TLS files in ``data_dir``, None if it was never initialised."""
    d = tls_dir(data_dir)
    if not (d / "master.pem").exists():
        return None
    return TlsFiles.of(d / "ca.pem", d / "master.pem", d / "master.key")


def bootstrap(data_dir: str | Path, hosts: tuple[str, ...] = ()) -> Bootstrap:
    """Make a cluster's CA, the master's certificate, an ``admin`` client certificate
    and a first admin token (its digest stored in the master's store).

    Run before the master starts (it reads its tokens at start). Refuses a data
    directory that already has a CA.
    """
    d = tls_dir(data_dir)
    pki.make_ca(d)
    pki.issue(d, "master", "master", hosts=("localhost", "127.0.0.1", "::1", *hosts))
    client = pki.issue(d, "client", "admin")
    tid, token = tokens.new_token()
    store = Store(Path(data_dir) / "hotwire.db")
    try:
        store.put_token(tid, tokens.digest(token), "admin", "first admin (streamctl init)").result()
    finally:
        store.close()
    fd = os.open(d / "admin.token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return Bootstrap(d, d / "ca.pem", client.cert, client.key, tid, token)
