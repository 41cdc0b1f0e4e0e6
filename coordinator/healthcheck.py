"""`python -m coordinator.healthcheck`: exit 0 when the coordinator's gRPC health service says SERVING, else 1.

For container health checks and exec probes. It reads the settings `fedmeki-coordinator serve` reads
(`--config coordinator.yaml`, `FEDMEKI_COORDINATOR_*`) and asks the plaintext health-only port
(`health_address`), or the main port of a coordinator without TLS; a coordinator that serves mTLS only and has
no health port cannot be asked without a client certificate, and is reported as a configuration error (2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.settings import CoordinatorSettings
from fedmeki_core.client import open_channel
from fedmeki_core.errors import FedmekiError, InvalidInputError
from fedmeki_core.metrics_endpoint import split_address

_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - listening on every address is dialled on loopback


def probe_address(settings: CoordinatorSettings) -> str:
    if settings.health_address:
        address = settings.health_address
    elif settings.kit is None:
        address = settings.address
    else:
        raise InvalidInputError("the coordinator serves mTLS only: set health_address to probe it without a kit")
    host, port = split_address(address)
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check(address: str, service: str, timeout: float) -> str | None:
    """None when SERVING, else what is wrong."""
    with open_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.healthcheck", description=__doc__)
    parser.add_argument("--config", type=Path, help="the coordinator's YAML settings file")
    parser.add_argument("--address", help="HOST:PORT to ask instead of the one the settings give")
    parser.add_argument("--service", default="", help="a service name; default: the whole server")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        address = args.address or probe_address(CoordinatorSettings.load(args.config))
    except FedmekiError as exc:
        print(f"healthcheck: {exc.message}", file=sys.stderr)
        return 2
    problem = check(address, args.service, args.timeout)
    if problem is not None:
        print(f"healthcheck: {address} is not serving ({problem})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
