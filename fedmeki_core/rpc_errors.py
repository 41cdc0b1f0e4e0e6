"""The client side of the error table: gRPC status codes back to FedmekiError subclasses."""

from __future__ import annotations

import re

import grpc

from fedmeki_core.errors import (
    AlreadyExistsError,
    AuthenticationError,
    ConflictError,
    FedmekiError,
    ForbiddenError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)

_ERROR_BY_STATUS: dict[grpc.StatusCode, type[FedmekiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: ForbiddenError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


# Trailing metadata of a refusal that is worth retrying later (the coordinator is at capacity): BusyError.
RETRY_LATER = ("fedmeki-retry", "later")
# and, when the coordinator can tell, how long to wait first (an upload refused at the cap: its turn), in ms
RETRY_AFTER_MS = "fedmeki-retry-after-ms"
# The longest wait a coordinator tells; a client believes no more (the value crosses a trust boundary).
LONGEST_TOLD_WAIT_SECONDS = 60.0


_NOT_CONNECTED = ("Connection refused", "DNS resolution failed", "No address")


def retry_later(exc: grpc.RpcError) -> bool:
    """Whether the coordinator refused the call only because it is at capacity now (nothing was done)."""
    # gRPC's asyncio server holds calls past maximum_concurrent_rpcs instead of refusing them, so only our own
    # capacity refusals (marked RETRY_LATER) mean "busy".
    return isinstance(exc, grpc.Call) and RETRY_LATER in (exc.trailing_metadata() or ())


def busy_metadata(retry_after: float | None) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a busy refusal (BusyError), with its wait when there is one."""
    if retry_after is None:
        return (RETRY_LATER,)
    return RETRY_LATER, (RETRY_AFTER_MS, str(max(0, round(retry_after * 1000))))


def _retry_after(exc: grpc.Call) -> float | None:
    """The told wait, at most LONGEST_TOLD_WAIT_SECONDS; None (the caller's own backoff) for a value that is not a
    count of milliseconds of at most 12 digits (`int` refuses thousands of digits, and a silo would wait years)."""
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_MS and isinstance(value, str) and re.fullmatch("[0-9]{1,12}", value):
            return min(int(value) / 1000, LONGEST_TOLD_WAIT_SECONDS)
    return None


def error_from_rpc(exc: grpc.RpcError) -> FedmekiError:
    """The domain error for a failed call, carrying the server's message; a busy server's is UnavailableError,
    which callers retry, though its status (RESOURCE_EXHAUSTED) is otherwise final."""
    if not isinstance(exc, grpc.Call):
        return FedmekiError(str(exc) or grpc.StatusCode.UNKNOWN.name)
    code, details = exc.code(), exc.details() or exc.code().name
    if retry_later(exc):
        return UnavailableError(f"the coordinator is busy: {details}", retry_after=_retry_after(exc))
    return _ERROR_BY_STATUS.get(code, FedmekiError)(details)


def never_connected(error: FedmekiError) -> bool:
    """Whether a call failed because no connection to the coordinator could be made (so it never saw the call)."""
    return isinstance(error, UnavailableError) and any(text in error.message for text in _NOT_CONNECTED)


def with_connection_hint(error: FedmekiError, address: str, tls: bool) -> FedmekiError:
    """An unreachable coordinator's error with the next step in it: gRPC says only `Socket closed` (a plaintext
    call to a coordinator that serves mTLS) or `Connection refused` (nothing listens at the address)."""
    if not isinstance(error, UnavailableError):
        return error
    if "Socket closed" in error.message and not tls:
        hint = (
            f"the coordinator at {address} closed a plaintext connection: it probably serves mTLS; "
            "connect with a startup kit (--kit DIR)"
        )
    elif never_connected(error):
        hint = f"nothing answers at {address}: check the address and port, and that the coordinator runs there"
    else:
        return error
    return UnavailableError(f"{hint} ({error.message})")
