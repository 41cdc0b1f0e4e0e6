"""`fedmeki he`: the hospitals' side of CKKS secure aggregation (make a key set, rebuild a job's model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmeki_core.privacy.he.keys import PUBLIC_FILE, SECRET_FILE, read_secret_context, write_key_files


def _keygen(args: argparse.Namespace) -> int:
    context = write_key_files(args.output)
    print(f"CKKS key set {context.fingerprint} written to {args.output}:")
    print(
        f"  {args.output / SECRET_FILE}  (secret key, mode 0600): copy to every silo; ckks_secret_context in silo.yaml"
    )
    print(f"  {args.output / PUBLIC_FILE}  (public): submit CKKS jobs with it (--ckks-public-context); never")
    print("  give the secret file to the coordinator or to anyone outside the federation's hospitals")
    return 0


def _model(args: argparse.Namespace, default_coordinator: str) -> int:
    from fedmeki_core.client import FedmekiClient
    from fedmeki_core.kits import Role, load_kit

    secret = read_secret_context(args.key)
    kit = load_kit(args.kit, Role.RESEARCHER, Role.ADMIN) if args.kit else None
    address = args.coordinator or (kit.coordinator if kit else default_coordinator)
    with FedmekiClient(address, kit=kit) as client:
        round_number = client.download_decrypted(args.job_id, secret, args.output, args.round)
    print(f"the plaintext model after round {round_number}, rebuilt with {args.key}, written to {args.output}")
    return 0


def add_he_command(commands: Any, default_coordinator: str) -> None:
    """`fedmeki he keygen` and `fedmeki he model` on the main parser's subcommands."""
    he = commands.add_parser("he", help="CKKS secure aggregation: keys and models, at the hospitals").add_subparsers(
        dest="he_command", required=True
    )
    keygen = he.add_parser("keygen", help="make a federation's CKKS key set (secret.ckks, public.ckks)")
    keygen.add_argument("--output", type=Path, required=True, help="a folder; an existing key set is never replaced")
    keygen.set_defaults(handler=_keygen)
    model = he.add_parser("model", help="a CKKS job's plaintext model: checkpoint 0 plus the decrypted aggregates")
    model.add_argument("job_id")
    model.add_argument("--key", type=Path, required=True, help="the federation's secret.ckks")
    model.add_argument("-o", "--output", type=Path, required=True)
    model.add_argument("--round", type=int, default=-1, help="after this round (default: the latest)")
    model.add_argument(
        "--coordinator", help=f"HOST:PORT of the coordinator (default: the kit's, else {default_coordinator})"
    )
    model.add_argument("--kit", type=Path, help="your startup kit (fedmeki provision): mTLS as its researcher or admin")
    model.set_defaults(handler=lambda args: _model(args, default_coordinator))
