"""`spk-core certs init`: a small CA, a server certificate and satellite client certificates.

For quick setups and tests; production fleets may bring their own PKI. Keys are EC P-256, written
0600; certificates are valid for 825 days (the CA/Browser Forum ceiling browsers still accept).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import InvalidArgument

VALID_DAYS = 825


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "script-packages"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def make_ca(
    common_name: str = "script-packages CA",
) -> tuple[Issued, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key, cert


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    hosts: Sequence[str] = (),
    client: bool = False,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(_name(common_name), ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_dir(out: Path, hosts: Sequence[str], satellites: Sequence[str]) -> list[Path]:
    """Write ca.pem, server.pem/.key and <satellite>.pem/.key into `out`; refuses to overwrite."""
    if not hosts:
        raise InvalidArgument(
            "--host", "give at least one host name or IP for the server certificate"
        )
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.key").exists():
        raise InvalidArgument("DIR", f"{out} already holds a CA (ca.key); pick an empty directory")
    ca, ca_key, ca_cert = make_ca()
    written: list[tuple[str, bytes, int]] = [
        ("ca.pem", ca.cert_pem, 0o644),
        ("ca.key", ca.key_pem, 0o600),
    ]
    server = issue(ca_key, ca_cert, hosts[0], hosts)
    written += [("server.pem", server.cert_pem, 0o644), ("server.key", server.key_pem, 0o600)]
    for name in satellites:
        client = issue(ca_key, ca_cert, name, client=True)
        written += [(f"{name}.pem", client.cert_pem, 0o644), (f"{name}.key", client.key_pem, 0o600)]
    paths = []
    for filename, data, mode in written:
        _write(out / filename, data, mode)
        paths.append(out / filename)
    return paths
