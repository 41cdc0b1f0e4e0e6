"""`fedmeki kit export-p12`: a researcher's or admin's kit as one PKCS#12 file, to import into a web browser.

The coordinator's dashboard takes the same client certificates as its API; browsers take them as PKCS#12 (the
certificate, its private key and the project CA in one password-protected file). Made with `cryptography`, no
openssl needed. The password is generated and printed once unless `--password-env VAR` names one.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from fedmeki_core.app.provision import write_private
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.kits import Kit, Role, load_kit


def export_pkcs12(kit: Kit, password: bytes) -> bytes:
    """The kit's certificate and key, with the project CA, encrypted with `password` (PBES2, AES-256)."""
    key = serialization.load_pem_private_key(kit.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):  # provision makes ECDSA P-256 keys
        raise InvalidInputError(f"{kit.path}: a {type(key).__name__} cannot go into a PKCS#12 file for browsers")
    return pkcs12.serialize_key_and_certificates(
        name=f"fedmeki {kit.role.value} {kit.name}".encode(),
        key=key,
        cert=x509.load_pem_x509_certificate(kit.cert_pem),
        cas=[x509.load_pem_x509_certificate(kit.ca_pem)],
        encryption_algorithm=serialization.BestAvailableEncryption(password),
    )


def _export_command(args: argparse.Namespace) -> int:
    kit = load_kit(args.kit, Role.RESEARCHER, Role.ADMIN)
    if args.password_env:
        password = os.environ.get(args.password_env, "")
        if not password:
            raise InvalidInputError(f"the environment variable {args.password_env} is not set or empty")
    else:
        password = secrets.token_urlsafe(18)
    try:
        write_private(args.output, export_pkcs12(kit, password.encode()))
    except FileExistsError:
        raise InvalidInputError(f"{args.output} exists: not overwritten") from None
    print(f"wrote {args.output}: {kit.role.value} {kit.name!r}, with the project CA (mode 0600)")
    if not args.password_env:
        print(f"its import password (shown once): {password}")
    print(f"import it as your certificate, and {kit.path / 'ca.crt'} as a trusted authority, in your browser")
    return 0


def add_kit_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kit = commands.add_parser("kit", help="use a startup kit elsewhere").add_subparsers(
        dest="kit_command", required=True
    )
    export = kit.add_parser(
        "export-p12", help="a researcher's or admin's kit as a PKCS#12 file for a browser (the dashboard)"
    )
    export.add_argument("kit", type=Path, help="the kit folder (fedmeki provision)")
    export.add_argument("-o", "--output", type=Path, required=True, help="the .p12 file to write")
    export.add_argument("--password-env", metavar="VAR", help="take the password from this environment variable")
    export.set_defaults(handler=_export_command)
