"""TLS material for a federation, made with ``cryptography``: a CA, the SuperLink's certificate and
SuperNode key pairs. Private keys are created with permissions 0600 (never world-readable, not even
for an instant) and written atomically.

The CA key is kept beside the CA certificate (``ca.key``, 0600) so the SuperLink certificate can be
renewed (:func:`make_server_certificate` again) without re-enrolling every device, which trusts ``ca.crt``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

from device_agents.federated.join import make_node_key
from edgekit._io import write_atomic

__all__ = ["make_certificates", "make_node_key", "make_server_certificate"]

VALIDITY = dt.timedelta(days=365)
PRIVATE = 0o600


def _pem_key(key: Any, fmt: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def make_certificates(folder: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A new CA (``ca.crt``, ``ca.key``) and a SuperLink certificate for ``hosts`` (``server.pem``, ``server.key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgekit federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=True, crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "ca_key": folder / "ca.key"}
    write_atomic(paths["ca_key"], _pem_key(ca_key, serialization.PrivateFormat.PKCS8), mode=PRIVATE)
    write_atomic(paths["ca"], ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.update(make_server_certificate(folder, hosts=hosts))
    return paths


def make_server_certificate(folder: Path, *, hosts: tuple[str, ...]) -> dict[str, Path]:
    """Issue (or renew) the SuperLink certificate ``server.pem``/``server.key`` from the CA in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"cert": folder / "server.pem", "key": folder / "server.key"}
    write_atomic(paths["key"], _pem_key(key, serialization.PrivateFormat.PKCS8), mode=PRIVATE)
    write_atomic(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    return paths
