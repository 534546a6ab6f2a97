"""The cluster CA and the certificates it issues.

A cluster has one CA. Every certificate it issues names one party in its
subject: the common name is the party's name, the organizational unit its kind
(``master``, ``worker`` or ``client``). A worker's identity is the name in its
certificate: the master registers it only under that name, and the data plane
accepts a HELLO only when it names the certificate's worker.

The master's certificate also carries the DNS name :data:`MASTER_SAN`, the name
clients check it against whatever address they dial, so a master's address can
change (a NAT, a second interface) without reissuing its certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# What a party's name may be (it ends up in certificate subjects, log lines and
# paths): the rule of app and PE names.
from hotwire.names import NAME_RE

MASTER_SAN = "hotwire-master"
KINDS = ("master", "worker", "client")
VALID_DAYS = 825
CA_VALID_DAYS = 3650


class PkiError(Exception):
    """A CA or certificate that cannot be made or read (one line, for the CLI)."""


@dataclass(frozen=True)
class Issued:
    """Where a certificate and its key were written."""

    cert: Path
    key: Path


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name or ""):
        raise PkiError(
            f"{what} {name!r} is not allowed: use 1-63 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A key is created 0600 from the start: never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(directory: str | Path, cluster: str = "hotwire") -> Issued:
    """A new CA in ``directory`` (``ca.pem``, ``ca.key``); refuses to replace one."""
    d = Path(directory)
    cert_path, key_path = d / "ca.pem", d / "ca.key"
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"{d} already has a CA; remove it first to make a new one")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} cluster CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), secret=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return Issued(cert_path, key_path)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError as e:
        raise PkiError(f"no CA in {directory} ({e.filename} is missing)") from None
    except ValueError as e:
        raise PkiError(f"the CA in {directory} cannot be read: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"the CA key in {directory} is not an EC key")
    return cert, key


def issue(
    ca_dir: str | Path,
    kind: str,
    name: str,
    out_dir: str | Path | None = None,
    hosts: tuple[str, ...] = (),
) -> Issued:
    """Issue a ``kind`` certificate for ``name`` from the CA in ``ca_dir``.

    Written as ``<out_dir>/<name>.pem`` and ``<out_dir>/<name>.key`` (``out_dir``
    defaults to ``ca_dir``). ``hosts`` (DNS names or IP addresses) are added to
    the subject alternative names, besides the name itself (and, for the master,
    :data:`MASTER_SAN`).
    """
    if kind not in KINDS:
        raise PkiError(f"unknown certificate kind {kind!r} (one of {', '.join(KINDS)})")
    check_name(name, f"{kind} name")
    if kind == "worker" and name == MASTER_SAN:
        raise PkiError(f"{MASTER_SAN!r} is reserved for the master")
    ca_path = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_path)
    out = Path(out_dir) if out_dir is not None else ca_path
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    if kind == "master":
        sans.append(x509.DNSName(MASTER_SAN))
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usages = {
        "master": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "worker": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    }[kind]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    issued = Issued(out / f"{name}.pem", out / f"{name}.key")
    _write(issued.key, _key_pem(key), secret=True)
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return issued


def identity(cert_pem: bytes) -> tuple[str, str]:
    """(kind, name) a certificate names: its organizational unit and common name."""
    cert = x509.load_pem_x509_certificate(cert_pem)

    def attr(oid: x509.ObjectIdentifier) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    return attr(NameOID.ORGANIZATIONAL_UNIT_NAME), attr(NameOID.COMMON_NAME)
