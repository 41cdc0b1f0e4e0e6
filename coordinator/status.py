"""The one table from domain errors to gRPC status codes, and the wrappers servicers use to apply it."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from fedmeki_core.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BusyError,
    ConflictError,
    FedmekiError,
    ForbiddenError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    PreconditionError,
    StalledError,
    UnavailableError,
)
from fedmeki_core.rpc_errors import busy_metadata

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[FedmekiError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    ForbiddenError: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ConflictError: grpc.StatusCode.ABORTED,
    StalledError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def safe_text(text: str, limit: int = 1000) -> str:
    """Text from callers made fit to send and to store: NUL bytes (PostgreSQL refuses them) and unpaired surrogates
    (UTF-8 cannot encode them) escaped, cut to `limit` characters (gRPC refuses status details over 8 KiB)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def status_for(error: FedmekiError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, grpc.aio.AbortError):  # aborted already, with its own status
        raise exc
    if isinstance(exc, FedmekiError):
        metadata = busy_metadata(exc.retry_after) if isinstance(exc, BusyError) else ()
        await context.abort(status_for(exc), safe_text(exc.message), metadata)
        raise AssertionError("unreachable: abort raises")
    reference = uuid.uuid4().hex[:12]
    if database_unavailable(exc):  # an outage, not a bug: the caller retries (agents do, with backoff)
        logger.warning("database unavailable (ref %s): %s", reference, str(exc).splitlines()[0][:300])
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"the coordinator's database is unavailable (ref {reference}); retry later",
        )
        raise AssertionError("unreachable: abort raises")
    logger.error("internal error (ref %s)", reference, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {reference}); see the coordinator log")
    raise AssertionError("unreachable: abort raises")


def database_unavailable(exc: BaseException) -> bool:
    """A database that cannot be reached or is busy now (connection refused or lost, SQLite locked), as opposed
    to a statement that is wrong, which stays INTERNAL."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


F = TypeVar("F", bound=Callable[..., Any])


def unary(handler: F) -> F:
    """Translate domain errors raised by a coroutine handler that returns one response."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            await _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def streaming(handler: F) -> F:
    """Translate domain errors raised by an async generator handler that yields responses."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in handler(self, request, context):
                yield response
        except Exception as exc:
            await _abort(context, exc)

    return wrapper  # type: ignore[return-value]
