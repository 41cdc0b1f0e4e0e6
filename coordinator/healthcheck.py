"""`python -m coordinator.healthcheck`: exit 0 when the coordinator's gRPC health service says SERVING, else 1.

For container health checks and exec probes. It reads the settings `fedmeki-coordinator serve` reads
(`--config coordinator.yaml`, `FEDMEKI_COORDINATOR_*`) and asks the plaintext health-only port
(`health_address`), or the main port of a coordinator without TLS. A coordinator that serves mTLS only is asked
on its main port over mTLS with `--kit DIR` (a researcher's or the admin's kit of the project); without a kit
nor a health port that is a configuration error (2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.settings import CoordinatorSettings
from fedmeki_core.channels import open_channel
from fedmeki_core.errors import FedmekiError, InvalidInputError
from fedmeki_core.kits import Kit, load_kit
from fedmeki_core.metrics_endpoint import split_address

_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - listening on every address is dialled on loopback


def probe_address(settings: CoordinatorSettings) -> str:
    address = settings.health_address or settings.address
    host, port = split_address(address)
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def probe_kit(settings: CoordinatorSettings, kit: Path | None) -> Kit | None:
    """The kit to ask an mTLS-only coordinator with; None for a plaintext port."""
    if settings.health_address or settings.kit is None:
        return load_kit(kit) if kit else None
    if kit is None:
        raise InvalidInputError(
            "the coordinator serves mTLS only: ask it with --kit DIR (a kit of the project, such as DIR/admin) "
            "or set health_address for a plaintext health port"
        )
    return load_kit(kit)


def check(address: str, service: str, timeout: float, kit: Kit | None = None) -> str | None:
    """None when SERVING, else what is wrong."""
    with open_channel(address, kit) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            hint = "" if kit is not None else " (a coordinator that serves mTLS needs --kit DIR)"
            return f"{exc.code().name}: {exc.details()}{hint}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.healthcheck", description=__doc__)
    parser.add_argument("--config", type=Path, help="the coordinator's YAML settings file")
    parser.add_argument("--address", help="HOST:PORT to ask instead of the one the settings give")
    parser.add_argument("--service", default="", help="a service name; default: the whole server")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--kit", type=Path, help="a startup kit (researcher or admin) to ask an mTLS coordinator with")
    args = parser.parse_args(argv)
    try:
        settings = CoordinatorSettings.load(args.config)
        address = args.address or probe_address(settings)
        if args.address:
            kit = load_kit(args.kit) if args.kit else None
        else:
            kit = probe_kit(settings, args.kit)
    except FedmekiError as exc:
        print(f"healthcheck: {exc.message}", file=sys.stderr)
        return 2
    problem = check(address, args.service, args.timeout, kit)
    if problem is not None:
        print(f"healthcheck: {address} is not serving ({problem})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
