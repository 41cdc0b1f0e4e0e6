"""The FedmekiError tree: domain errors that know nothing of the transport.

    FedmekiError
    ├── InvalidInputError        a request, spec or upload is malformed (INVALID_ARGUMENT)
    │   ├── InvalidJobSpecError  names the offending field
    │   └── InvalidUpdateError   an update that does not match the round's manifest, or is corrupt
    │       └── TruncatedUpdateError  the stream ended short (a killed silo's does): the bytes are held to resume
    ├── NotFoundError            no such job, round, checkpoint or silo (NOT_FOUND)
    ├── AlreadyExistsError       a duplicate: upload, silo name, report (ALREADY_EXISTS)
    ├── PreconditionError        valid, but not now: round closed, silo not selected (FAILED_PRECONDITION)
    ├── AuthenticationError      no credential, or an unknown one (UNAUTHENTICATED)
    ├── ForbiddenError           a known identity that may not do this, e.g. revoked (PERMISSION_DENIED)
    ├── LimitExceededError       a declared size or length over a configured limit (RESOURCE_EXHAUSTED)
    │   └── BusyError            at capacity now, e.g. too many uploads at once; the status says to retry
    │       └── StorageFullError a write found the disk (or quota) full: ENOSPC, EDQUOT
    ├── ConflictError            a concurrent operation got there first; retry later (ABORTED)
    ├── StalledError             a client stream sent too little for too long and was cut (DEADLINE_EXCEEDED)
    └── UnavailableError         the other side cannot be reached, or went away mid-call (UNAVAILABLE)

The coordinator maps these to gRPC status codes in one table; clients map status codes back.
"""


class FedmekiError(Exception):
    """Base of every error fedmeki raises on purpose; the message is safe to show to the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(FedmekiError):
    pass


class InvalidJobSpecError(InvalidInputError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid job spec: {field}: {problem}")
        self.field = field


class InvalidUpdateError(InvalidInputError):
    pass


class TruncatedUpdateError(InvalidUpdateError):
    pass


class NotFoundError(FedmekiError):
    pass


class AlreadyExistsError(FedmekiError):
    pass


class PreconditionError(FedmekiError):
    pass


class AuthenticationError(FedmekiError):
    pass


class ForbiddenError(FedmekiError):
    pass


class LimitExceededError(FedmekiError):
    pass


class BusyError(LimitExceededError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds to wait before asking again, when the coordinator can tell


class StorageFullError(BusyError):
    pass


class ConflictError(FedmekiError):
    pass


class StalledError(FedmekiError):
    pass


class UnavailableError(FedmekiError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # a busy coordinator's wait until the caller's turn (BusyError's), if told
