"""Certificates as gRPC credentials and ``ssl`` contexts; peers' identities; profiles.

Every hotwire channel is mutual TLS under the cluster CA (see
:mod:`hotwire.security.pki`): the master's gRPC port asks every client for a
certificate, and the workers' data plane asks every peer for one. Clients check
the master's certificate against :data:`~hotwire.security.pki.MASTER_SAN`
rather than the address they dial.

A *profile* is what a client needs to reach one cluster (CA, client certificate,
key, token), kept under ``$HOTWIRE_HOME/clusters/<host>_<port>/`` (default
``~/.config/hotwire``). ``streamctl up`` and ``streamctl init`` write one, so the
shells of the same user reach a local cluster with no flags; flags and the
``HOTWIRE_CA``/``HOTWIRE_CERT``/``HOTWIRE_KEY``/``HOTWIRE_TOKEN`` variables win
over it.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hotwire.security.pki import MASTER_SAN, PkiError, identity


@dataclass(frozen=True)
class TlsFiles:
    """A party's certificate, its key, and the cluster CA that checks its peers."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, ca: str | Path, cert: str | Path, key: str | Path) -> TlsFiles:
        files = cls(Path(ca), Path(cert), Path(key))
        for what, p in (("CA", files.ca), ("certificate", files.cert), ("key", files.key)):
            if not p.is_file():
                raise PkiError(f"TLS {what} file {str(p)!r} does not exist")
        return files

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    def identity(self) -> tuple[str, str]:
        """(kind, name) of this party's own certificate."""
        try:
            return identity(self.cert.read_bytes())
        except ValueError as e:
            raise PkiError(f"certificate {str(self.cert)!r} cannot be read: {e}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self.read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )

    def channel_credentials(self, token: str = "") -> grpc.ChannelCredentials:
        ca, cert, key = self.read()
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        if token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token)
            )
        return creds

    def server_context(self) -> ssl.SSLContext:
        """For accepting data-plane connections: a peer certificate from the CA is required."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For dialling a peer worker: its certificate must come from the CA. The name
        in it is checked against the worker dialled by the caller (not as a host name)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def channel_options() -> list[tuple[str, Any]]:
    """gRPC channel options that check the master's certificate by its cluster name."""
    return [("grpc.ssl_target_name_override", MASTER_SAN)]


def grpc_peer(context: Any) -> tuple[str, str] | None:
    """(kind, name) from the client certificate of a gRPC call, None without one."""
    auth = context.auth_context()
    pem = auth.get("x509_pem_cert")
    if not pem:
        return None
    try:
        return identity(pem[0])
    except ValueError:
        return None


def ssl_peer(peercert: dict[str, Any] | None) -> tuple[str, str] | None:
    """(kind, name) from ``ssl``'s dict of a verified peer certificate."""
    if not peercert:
        return None
    fields = {k: v for rdn in peercert.get("subject", ()) for k, v in rdn}
    return fields.get("organizationalUnitName", ""), fields.get("commonName", "")


def is_loopback(addr: str) -> bool:
    """True when HOST:PORT listens on a loopback address only."""
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# Client profiles
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientCredentials:
    """What a client presents to a master: TLS files (None: plaintext) and a token."""

    tls: TlsFiles | None = None
    token: str = ""
    profile: Path | None = None  # the profile that filled in the TLS files, if one did


def home() -> Path:
    return Path(os.environ.get("HOTWIRE_HOME") or Path.home() / ".config" / "hotwire")


def profile_dir(master: str) -> Path:
    host, _, port = master.rpartition(":")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{host}_{port}")
    return home() / "clusters" / safe


def write_profile(master: str, ca: Path, cert: Path, key: Path, token: str) -> Path:
    """Keep what a client needs to reach ``master`` (0700 directory, 0600 secrets)."""
    d = profile_dir(master)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name, src, secret in (
        ("ca.pem", ca, False),
        ("client.pem", cert, False),
        ("client.key", key, True),
    ):
        _write(d / name, src.read_bytes(), secret)
    _write(d / "token", token.encode() + b"\n", True)
    return d


def _write(path: Path, data: bytes, secret: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def client_credentials(
    master: str,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    token: str | None = None,
) -> ClientCredentials:
    """The credentials to reach ``master``: the arguments, else the ``HOTWIRE_*``
    variables, else the master's profile; plaintext when none of them has a CA."""
    ca = ca or os.environ.get("HOTWIRE_CA") or None
    cert = cert or os.environ.get("HOTWIRE_CERT") or None
    key = key or os.environ.get("HOTWIRE_KEY") or None
    token = token or os.environ.get("HOTWIRE_TOKEN") or None
    prof = profile_dir(master)
    used = None
    if (prof / "ca.pem").is_file():  # the profile fills in what was not given
        used = prof if ca is None else None
        ca = ca or str(prof / "ca.pem")
        cert = cert or str(prof / "client.pem")
        key = key or str(prof / "client.key")
    if token is None and (prof / "token").is_file():
        token = (prof / "token").read_text().strip()
    if ca is None:
        return ClientCredentials(None, token or "")
    if cert is None or key is None:
        raise PkiError("a CA was given without a client certificate and key (--cert, --key)")
    return ClientCredentials(TlsFiles.of(ca, cert, key), token or "", used)


def dial(master: str, creds: ClientCredentials, options: list[tuple[str, Any]]) -> grpc.Channel:
    """A blocking gRPC channel to ``master`` with ``creds``."""
    if creds.tls is None:
        if creds.token:
            # A token over plaintext would be readable by anyone on the path: never send it.
            raise PkiError("a token is only sent over TLS: give the cluster's CA (--ca)")
        return grpc.insecure_channel(master, options=options)
    return grpc.secure_channel(
        master, creds.tls.channel_credentials(creds.token), options=options + channel_options()
    )


def dial_aio(master: str, tls: TlsFiles | None, options: list[tuple[str, Any]]) -> Any:
    """An asyncio gRPC channel to ``master`` (a worker's: certificate, no token)."""
    if tls is None:
        return grpc.aio.insecure_channel(master, options=options)
    return grpc.aio.secure_channel(
        master, tls.channel_credentials(), options=options + channel_options()
    )


class InsecureRefused(Exception):
    """A master or worker asked to listen beyond loopback without TLS and no --insecure."""
