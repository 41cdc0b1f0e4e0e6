"""Startup kits: the folder each site gets from `fedmeki provision`, and the identity its certificate names.

A kit holds `ca.crt` (the project CA), `tls.crt` and `tls.key` (the site's certificate and private key: the
names of a Kubernetes TLS secret) and `kit.yaml` (role, name, coordinator address, certificate serial). A
certificate names its site in the subject: CN is the site's name, OU its role.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedmeki_core.errors import InvalidInputError

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CONFIG_FILE = "kit.yaml"


class Role(StrEnum):
    COORDINATOR = "coordinator"
    SILO = "silo"
    RESEARCHER = "researcher"
    ADMIN = "admin"


@dataclass(frozen=True)
class CertificateIdentity:
    """Who a certificate names: its role (subject OU), its site's name (CN) and its serial number."""

    role: Role
    name: str
    serial: int

    @property
    def label(self) -> str:
        return f"{self.role.value}:{self.name}"


def serial_text(serial: int) -> str:
    """The form serials are shown, stored and typed in: lower-case hex."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """A serial as `serial_text` writes it; also accepts a 0x prefix and colon-separated bytes (openssl's)."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return int(cleaned, 16)
    except ValueError:
        raise InvalidInputError(f"certificate serial {text!r} is not hexadecimal") from None


def certificate_identity(certificate: x509.Certificate) -> CertificateIdentity:
    """The role and name the subject carries; InvalidInputError when it carries no single known role and name."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(names) != 1 or len(units) != 1:
        raise InvalidInputError("the certificate's subject must name one site (CN) and one role (OU)")
    try:
        role = Role(str(units[0].value))
    except ValueError:
        raise InvalidInputError(f"the certificate's role (OU) {units[0].value!r} is not a fedmeki role") from None
    return CertificateIdentity(role=role, name=str(names[0].value), serial=certificate.serial_number)


@dataclass(frozen=True)
class Kit:
    """A loaded startup kit: what a process needs to speak mTLS as its site."""

    path: Path
    role: Role
    name: str
    coordinator: str  # HOST:PORT the coordinator's certificate is valid for
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def identity(self) -> CertificateIdentity:
        return certificate_identity(x509.load_pem_x509_certificate(self.cert_pem))


def load_kit(path: Path, *roles: Role) -> Kit:
    """Read a kit folder; with `roles`, the kit must be of one of them. Problems raise InvalidInputError."""
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text())
        ca_pem, cert_pem, key_pem = ((path / name).read_bytes() for name in (CA_FILE, CERT_FILE, KEY_FILE))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"{path} is not a readable startup kit: {exc}") from None
    if not isinstance(config, dict) or not {"role", "name", "coordinator"} <= config.keys():
        raise InvalidInputError(f"{path / CONFIG_FILE} must hold role, name and coordinator")
    try:
        role = Role(config["role"])
    except ValueError:
        raise InvalidInputError(f"{path / CONFIG_FILE}: unknown role {config['role']!r}") from None
    if roles and role not in roles:
        wanted = " or ".join(r.value for r in roles)
        raise InvalidInputError(f"{path} is the kit of {role.value} {config['name']!r}; this needs a {wanted} kit")
    return Kit(
        path=path,
        role=role,
        name=str(config["name"]),
        coordinator=str(config["coordinator"]),
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
    )
