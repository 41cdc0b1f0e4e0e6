"""`fedmeki provision`: a project CA and one startup kit per site (coordinator, silos, researchers, admin).

Keys are ECDSA P-256. The CA's key stays in `DIR/ca/` and in no kit; each kit holds only its own key (mode
0600). A later run on the same folder reuses the CA to issue kits for new silos or researchers.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmeki_core.errors import AlreadyExistsError, InvalidInputError
from fedmeki_core.kits import CA_FILE, CERT_FILE, CONFIG_FILE, KEY_FILE, Role, serial_text

CA_FOLDER = "ca"
CA_KEY_FILE = "ca.key"
DEFAULT_PORT = 50051
DEFAULT_DAYS = 730
_CA_DAYS = 3650
_CLOCK_SKEW = timedelta(minutes=5)  # a certificate is valid from a little before it was issued
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # the silo names the coordinator accepts
_RESERVED = frozenset({CA_FOLDER, Role.COORDINATOR.value, Role.ADMIN.value})


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only; never over an existing file."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def coordinator_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class IssuedCertificate:
    cert_pem: bytes
    key_pem: bytes
    serial: int


class ProjectCA:
    """The project's certificate authority: it signs every site's certificate."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.certificate = certificate
        self._key = key

    @classmethod
    def create(cls, project: str = "fedmeki") -> ProjectCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{project} project CA"),
            ]
        )
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=_CA_DAYS))
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
        return cls(certificate, key)

    @classmethod
    def load(cls, folder: Path) -> ProjectCA:
        try:
            certificate = x509.load_pem_x509_certificate((folder / CA_FILE).read_bytes())
            key = serialization.load_pem_private_key((folder / CA_KEY_FILE).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read the project CA in {folder}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidInputError(f"{folder / CA_KEY_FILE} is not an ECDSA key")
        return cls(certificate, key)

    def save(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True)
        (folder / CA_FILE).write_bytes(self.pem)
        write_private(folder / CA_KEY_FILE, _private_pem(self._key))

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        role: Role,
        name: str,
        hosts: Sequence[str] = (),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> IssuedCertificate:
        """A certificate for `name` in `role` (subject CN and OU), valid for DEFAULT_DAYS unless told otherwise.

        The coordinator's certificate is a TLS server certificate for `hosts`; every other one is a client's.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        organization = self.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        subject = x509.Name(
            [
                *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(o.value)) for o in organization),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if role == Role.COORDINATOR else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _CLOCK_SKEW)
            .not_valid_after(not_after or now + timedelta(days=DEFAULT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(host) for host in dict.fromkeys(hosts)]), critical=False
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            cert_pem=certificate.public_bytes(serialization.Encoding.PEM),
            key_pem=_private_pem(key),
            serial=certificate.serial_number,
        )


def write_kit(folder: Path, ca: ProjectCA, issued: IssuedCertificate, role: Role, name: str, coordinator: str) -> None:
    """One site's kit: the CA certificate, its own certificate and key (0600), and kit.yaml."""
    folder.mkdir(mode=0o700, parents=True)
    (folder / CA_FILE).write_bytes(ca.pem)
    (folder / CERT_FILE).write_bytes(issued.cert_pem)
    write_private(folder / KEY_FILE, issued.key_pem)
    config = {"role": role.value, "name": name, "coordinator": coordinator, "serial": serial_text(issued.serial)}
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


@dataclass(frozen=True)
class ProvisionedKit:
    role: Role
    name: str
    path: Path
    serial: int


def provision(
    output: Path,
    coordinator_host: str,
    silos: Sequence[str] = (),
    researchers: Sequence[str] = (),
    port: int = DEFAULT_PORT,
) -> list[ProvisionedKit]:
    """Write the kits. A new project (no `output/ca`) also gets its CA, the coordinator's kit and the admin's;
    an existing one reuses its CA for the silos and researchers named. Never overwrites a kit."""
    new_project = not (output / CA_FOLDER).exists()
    sites = [(Role.SILO, name) for name in silos] + [(Role.RESEARCHER, name) for name in researchers]
    names = [name for _, name in sites]
    for name in names:
        if not _NAME.match(name):
            raise InvalidInputError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
        if name in _RESERVED:
            raise InvalidInputError(f"site name {name!r} is reserved for the project's own folders")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidInputError(f"site name {duplicates[0]!r} is given twice: every site needs its own name")
    if new_project:
        sites = [(Role.COORDINATOR, coordinator_host), (Role.ADMIN, Role.ADMIN.value), *sites]
    elif not sites:
        raise InvalidInputError(f"{output / CA_FOLDER} exists: name the new --silo or --researcher kits to issue")
    folders = [output / (Role.COORDINATOR.value if role == Role.COORDINATOR else name) for role, name in sites]
    existing = [folder for folder in folders if folder.exists()]
    if existing:
        raise AlreadyExistsError(f"{existing[0]} already exists: a kit is never overwritten; choose another name")
    ca = ProjectCA.create() if new_project else ProjectCA.load(output / CA_FOLDER)
    if new_project:
        ca.save(output / CA_FOLDER)
    address = coordinator_address(coordinator_host, port)
    kits = []
    for (role, name), folder in zip(sites, folders, strict=True):
        hosts = (coordinator_host, "localhost", "127.0.0.1") if role == Role.COORDINATOR else ()
        issued = ca.issue(role, name, hosts)
        write_kit(folder, ca, issued, role, name, address)
        kits.append(ProvisionedKit(role=role, name=name, path=folder, serial=issued.serial))
    return kits


_NEXT_STEP = {
    Role.COORDINATOR: "fedmeki-coordinator serve --kit {path} --address 0.0.0.0:{port} --data-dir DATA_DIR",
    Role.SILO: "register it (fedmeki-coordinator silo add {name} --kit {coordinator} --data-dir DATA_DIR, the "
    "coordinator's), then at the hospital: fedmeki-silo run --kit {path} --config silo.yaml",
    Role.RESEARCHER: "fedmeki job list --kit {path}",
    Role.ADMIN: "fedmeki job cancel ID --kit {path} (cancels any researcher's job)",
}


def _provision_command(args: argparse.Namespace) -> int:
    kits = provision(args.output, args.coordinator_host, args.silo, args.researcher, args.port)
    ca_folder = args.output / CA_FOLDER
    if kits[0].role == Role.COORDINATOR:
        print(f"project CA: {ca_folder / CA_FILE}; its key {ca_folder / CA_KEY_FILE} is in no kit: keep it offline")
    for kit in kits:
        print(f"{kit.role.value} {kit.name}: {kit.path} (serial {serial_text(kit.serial)})")
        print(
            "  next: "
            + _NEXT_STEP[kit.role].format(
                path=kit.path, name=kit.name, port=args.port, coordinator=args.output / "coordinator"
            )
        )
    print("give each site its own folder only; revoke one with fedmeki-coordinator cert revoke --kit FOLDER")
    return 0


def add_provision_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("provision", help="a project CA and mTLS startup kits for every site")
    parser.add_argument("--output", type=Path, required=True, help="the project folder: ca/ and one kit per site")
    parser.add_argument("--coordinator-host", required=True, help="DNS name or IP the silos and researchers dial")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the coordinator's port (default 50051)")
    parser.add_argument("--silo", action="append", default=[], metavar="NAME", help="a hospital (repeatable)")
    parser.add_argument("--researcher", action="append", default=[], metavar="NAME", help="repeatable")
    parser.set_defaults(handler=_provision_command)
