"""The client side of the error table: gRPC status codes back to FedmekiError subclasses."""

from __future__ import annotations

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


def error_from_rpc(exc: grpc.RpcError) -> FedmekiError:
    """The domain error for a failed call, carrying the server's message."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return _ERROR_BY_STATUS.get(code, FedmekiError)(details or code.name)
