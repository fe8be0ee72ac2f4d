"""Credentials of a secure Flower deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

flwr 1.41 serves the SuperLink's APIs over TLS on one port (``flower-superlink
--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key``); SuperNodes and
the ``flwr`` CLI verify it against the CA (``--root-certificates ca.crt``, ``root-certificates``
in the CLI's ``config.toml``), which checks that the certificate names the address they dial
(a subject alternative name: ``127.0.0.1``, ``localhost``, ``::1`` by default, plus the hosts
given). With ``--enable-supernode-auth`` the SuperLink admits only SuperNodes whose EC public
keys were registered (``flwr supernode register supernode-<m>.pub``); a SuperNode signs with its
private key (``--auth-supernode-private-key supernode-<m>.key``, OpenSSH format).

Everything is made with ``cryptography`` on NIST P-384 keys (Flower accepts any NIST curve for
node keys). :func:`write_bundle` writes a folder atomically (a failed run leaves nothing) and
never overwrites one; ``bundle.json`` records what was made (SANs, validity, SHA-256
fingerprints of the certificates and public keys).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from livar_merge.errors import ConfigError

DEFAULT_SANS = ("127.0.0.1", "localhost", "::1")
CURVE = ec.SECP384R1


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LIVAR federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _window(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got {days}")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew
    return start, start + dt.timedelta(days=days)


def _key_usage(*, authority: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a TLS server signs handshakes and agrees keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not authority,
        key_cert_sign=authority,
        crl_sign=authority,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(name: str = "LIVAR federation CA", days: int = 365) -> Issued:
    """A self-signed certificate authority (may sign end-entity certificates only)."""
    key = ec.generate_private_key(CURVE())
    start, end = _window(days)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(authority=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    return Issued(certificate, key)


def parse_sans(names: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names: IP addresses as such, the rest as DNS names."""
    sans: list[x509.GeneralName] = []
    for name in names:
        name = name.strip()
        if not name:
            raise ConfigError("an empty subject alternative name")
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in name):
                raise ConfigError(f"{name!r} is neither an IP address nor a DNS name") from None
            sans.append(x509.DNSName(name))
    return sans


def server_certificate(ca: Issued, sans: Sequence[str] = DEFAULT_SANS, days: int = 365) -> Issued:
    """The SuperLink's TLS certificate, signed by ``ca``, valid for the names ``sans`` (the
    addresses SuperNodes and the CLI dial; a name missing here fails their TLS handshake)."""
    if not sans:
        raise ConfigError("a server certificate needs at least one subject alternative name")
    key = ec.generate_private_key(CURVE())
    start, end = _window(days)
    public = key.public_key()
    ca_public = ca.key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(str(sans[0])))
        .issuer_name(ca.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(end, ca.certificate.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(parse_sans(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(authority=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(ca.key, hashes.SHA384())
    )
    return Issued(certificate, key)


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair, as Flower reads them (OpenSSH format)."""

    key: ec.EllipticCurvePrivateKey

    def private_openssh(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )

    def public_openssh(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )


def node_key() -> NodeKey:
    """A new SuperNode key pair (NIST P-384)."""
    return NodeKey(ec.generate_private_key(CURVE()))


def _fingerprint(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def bundle_files(
    nodes: int, sans: Sequence[str] = DEFAULT_SANS, days: int = 365
) -> tuple[dict[str, bytes], dict[str, object]]:
    """The files of a credentials folder (``{name: bytes}``) and its ``bundle.json`` record:
    ``ca.crt``/``ca.key``, ``server.crt``/``server.key``, ``supernode-<m>.key``/``.pub`` for
    ``m < nodes``."""
    if nodes < 0:
        raise ConfigError(f"the number of SuperNodes must be >= 0, got {nodes}")
    ca = make_ca(days=days)
    server = server_certificate(ca, sans, days=days)
    files = {
        "ca.crt": ca.certificate_pem(),
        "ca.key": ca.key_pem(),
        "server.crt": server.certificate_pem(),
        "server.key": server.key_pem(),
    }
    for m in range(nodes):
        pair = node_key()
        files[f"supernode-{m}.key"] = pair.private_openssh()
        files[f"supernode-{m}.pub"] = pair.public_openssh()
    record: dict[str, object] = {
        "kind": "livar-flower-credentials",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "curve": CURVE.name,
        "server_sans": list(sans),
        "not_valid_after": server.certificate.not_valid_after_utc.isoformat(),
        "ca_fingerprint": _fingerprint(ca.certificate.public_bytes(serialization.Encoding.DER)),
        "server_fingerprint": _fingerprint(
            server.certificate.public_bytes(serialization.Encoding.DER)
        ),
        "supernodes": {
            f"supernode-{m}": _fingerprint(files[f"supernode-{m}.pub"]) for m in range(nodes)
        },
    }
    return files, record


SECRET_SUFFIX = ".key"


def write_bundle(
    out: str | Path, nodes: int, sans: Sequence[str] = DEFAULT_SANS, days: int = 365
) -> dict[str, object]:
    """Write a credentials folder ``out`` (it must not exist, or be empty): files built in a
    temporary folder beside it, private keys readable by the owner only, then renamed into
    place. Returns the ``bundle.json`` record."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder: not overwriting credentials")
    files, record = bundle_files(nodes, sans, days)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name, data in files.items():
            path = staging / name
            path.write_bytes(data)
            os.chmod(path, 0o600 if name.endswith(SECRET_SUFFIX) else 0o644)
        (staging / "bundle.json").write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(staging, 0o700)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
