"""Generate development/test TLS material: a CA, a server certificate for
127.0.0.1/localhost and a client certificate, all signed by that CA.

Usage: ``python scripts/gen_certs.py OUT_DIR [--force]``

Idempotent: files that exist and stay valid for at least a day are kept, so
bootstrap can call it every time. Only depends on ``cryptography`` so that it
runs before the project itself is importable. The keys are for local stacks
and CI only; production certificates come from the operator's PKI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")
VALIDITY = dt.timedelta(days=365)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgwarden development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # 0600 from the first byte: PostgreSQL refuses group/world readable keys.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)


def _still_valid(out: Path) -> bool:
    if not all((out / f).is_file() for f in FILES):
        return False
    now = dt.datetime.now(dt.UTC)
    for name in ("ca.crt", "server.crt", "client.crt"):
        cert = x509.load_pem_x509_certificate((out / name).read_bytes())
        if cert.not_valid_after_utc < now + dt.timedelta(days=1):
            return False
    return True


def generate(out: Path, *, force: bool = False) -> bool:
    """Write the CA, server and client pairs into ``out``; False if kept as is."""
    out.mkdir(parents=True, exist_ok=True)
    if not force and _still_valid(out):
        return False
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("pgwarden development CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf("localhost", server=True)
    client_key, client_cert = leaf("pgwarden-client", server=False)
    _write_key(out / "ca.key", ca_key)
    _write_cert(out / "ca.crt", ca)
    _write_key(out / "server.key", server_key)
    _write_cert(out / "server.crt", server_cert)
    _write_key(out / "client.key", client_key)
    _write_cert(out / "client.crt", client_cert)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--force", action="store_true", help="regenerate even if valid")
    args = parser.parse_args()
    made = generate(args.out, force=args.force)
    print(f"[gen_certs] {'generated' if made else 'kept'} TLS material in {args.out}")


if __name__ == "__main__":
    main()
