"""Channels to the coordinator: one constructor (`open_channel`) and one set of options for every channel the
project opens, kept free of torch so that the coordinator's own probes can dial it too."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from fedmeki_core.kits import Kit
from fedmeki_core.transport_options import channel_window_options
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 pings on a connection: one after `seconds` without traffic; no answer within `timeout_seconds` and
    the connection is declared dead, its calls fail with UNAVAILABLE and the channel reconnects. This is what
    notices a network that stops forwarding without closing anything (a NAT or firewall dropping state)."""

    seconds: float
    timeout_seconds: float

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", int(self.seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),  # between long polls too
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging while nothing gets through
            ("grpc.http2.ping_timeout_ms", int(self.timeout_seconds * 1000)),
        ]


def channel_options(
    chunk_bytes: int = DEFAULT_CHUNK_BYTES, keepalive: Keepalive | None = None
) -> list[tuple[str, int]]:
    """Every channel's options (open_channel): message limits, the HTTP/2 windows, the optional keepalive."""
    limit = chunk_bytes + (1 << 20)
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    return options + channel_window_options() + (keepalive.options() if keepalive else [])


def open_channel(
    address: str, kit: Kit | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, keepalive: Keepalive | None = None
) -> grpc.Channel:
    """A channel to the coordinator: mTLS as the kit's site (verifying the coordinator against the kit's CA),
    or plaintext without a kit; with `keepalive`, dead connections are detected (see Keepalive)."""
    options = channel_options(chunk_bytes, keepalive)
    if kit is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=kit.ca_pem, private_key=kit.key_pem, certificate_chain=kit.cert_pem
    )
    return grpc.secure_channel(address, credentials, options=options)
