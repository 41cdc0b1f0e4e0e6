"""The silo registry: add a hospital, enroll it (one-time token, or its certificate's first call), revoke it.

An enrollment token carries its expiry in the clear (`fmk-enroll-<unix time>_<secret>`); only its sha256 is
stored, so the expiry cannot be changed without making the token unknown. A token past it is refused, and
`fedmeki-coordinator silo token NAME` gives a silo not yet enrolled a new one.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from coordinator.credentials import SiloIdentity, digest, new_secret
from coordinator.store.database import Database
from coordinator.store.models import Silo, utcnow
from fedmeki_core.errors import (
    AlreadyExistsError,
    AuthenticationError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_EXPIRES = re.compile(r"^fmk-enroll-(\d{1,12})_")
ROLES = ("trainer", "injector", "evaluator")
DEFAULT_TOKEN_TTL = timedelta(days=7)


@dataclass(frozen=True)
class SiloInfo:
    id: str
    name: str
    enrolled: bool
    revoked: bool
    tasks: tuple[str, ...]
    device: str
    role: str
    last_seen_at: datetime | None


@dataclass(frozen=True)
class Enrollment:
    silo_id: str
    silo_name: str
    credential: str


def _info(silo: Silo) -> SiloInfo:
    return SiloInfo(
        id=silo.id,
        name=silo.name,
        enrolled=silo.enrolled_at is not None,
        revoked=silo.revoked,
        tasks=tuple(silo.tasks),
        device=silo.device,
        role=silo.role,
        last_seen_at=silo.last_seen_at,
    )


class SiloRegistry:
    def __init__(self, database: Database, token_ttl: timedelta = DEFAULT_TOKEN_TTL) -> None:
        self._database = database
        self._token_ttl = token_ttl

    def _new_token(self) -> tuple[str, datetime]:
        expires = (utcnow() + self._token_ttl).replace(microsecond=0)
        return new_secret(f"fmk-enroll-{int(expires.timestamp())}"), expires

    def add(self, name: str, role: str = "trainer") -> tuple[SiloInfo, str]:
        """Register a silo; returns it with its one-time enrollment token (shown once, stored hashed).

        A trainer trains the job's rounds on its private data; an injector (at the coordinator's site, with
        the public data) runs the knowledge-injection stage of jobs that have one; an evaluator (with a held-out
        test set) never trains and scores every committed checkpoint of the jobs that name it.
        """
        if not _NAME.match(name):
            raise InvalidInputError(f"silo name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)")
        if role not in ROLES:
            raise InvalidInputError(f"silo role {role!r}: expected one of {', '.join(ROLES)}")
        token, _ = self._new_token()
        with self._database.transaction() as session:
            if session.scalars(select(Silo).where(Silo.name == name)).first() is not None:
                raise AlreadyExistsError(f"a silo named {name!r} already exists")
            silo = Silo(
                id=uuid.uuid4().hex, name=name, enrollment_token_hash=digest(token), tasks=[], device="", role=role
            )
            session.add(silo)
            session.flush()
            return _info(silo), token

    def enroll(self, token: str) -> Enrollment:
        """Exchange a one-time enrollment token for the silo's credential."""
        credential = new_secret("fmk-silo")
        with self._database.transaction() as session:
            silo = session.scalars(select(Silo).where(Silo.enrollment_token_hash == digest(token))).first()
            if silo is None:
                raise AuthenticationError("unknown or already used enrollment token")
            if silo.revoked:
                raise AuthenticationError(f"silo {silo.name!r} has been revoked")
            expires = self._expiry(token, silo)
            if utcnow() >= expires:
                raise AuthenticationError(
                    f"the enrollment token of silo {silo.name!r} expired at {expires.isoformat(timespec='seconds')}: "
                    f"ask the operator for a new one (fedmeki-coordinator silo token {silo.name})"
                )
            silo.enrollment_token_hash = None
            silo.credential_hash = digest(credential)
            silo.enrolled_at = utcnow()
            return Enrollment(silo_id=silo.id, silo_name=silo.name, credential=credential)

    def _expiry(self, token: str, silo: Silo) -> datetime:
        """When the token stops being good: the time it carries, or (a token from before they carried one) its
        silo's registration plus the time to live."""
        match = _EXPIRES.match(token)
        if match is None:
            return silo.created_at + self._token_ttl
        return datetime.fromtimestamp(int(match.group(1)), UTC)

    def new_token(self, name: str) -> tuple[str, datetime]:
        """A new enrollment token (and its expiry) for a silo not yet enrolled; its earlier token is void."""
        token, expires = self._new_token()
        with self._database.transaction() as session:
            silo = session.scalars(select(Silo).where(Silo.name == name)).first()
            if silo is None:
                raise NotFoundError(f"no silo named {name!r}")
            if silo.revoked or silo.enrolled_at is not None:
                state = "revoked" if silo.revoked else "enrolled already"
                raise InvalidInputError(f"silo {name!r} is {state}: it takes no enrollment token")
            silo.enrollment_token_hash = digest(token)
        return token, expires

    def certified(self, name: str) -> SiloIdentity:
        """The silo a verified certificate names. Its first call enrolls it: the certificate is its credential,
        and the enrollment token it never needed is void from then on."""
        with self._database.read() as session:
            silo = session.scalars(select(Silo).where(Silo.name == name)).first()
        if silo is None:
            raise AuthenticationError(
                f"no registered silo named {name!r}: the operator registers it with fedmeki-coordinator silo add {name}"
            )
        if silo.revoked:
            raise ForbiddenError(f"silo {name!r} has been revoked")
        if silo.enrolled_at is None:
            with self._database.transaction() as session:
                row = session.get(Silo, silo.id)
                if row is not None and row.enrolled_at is None:
                    row.enrolled_at = utcnow()
                    row.enrollment_token_hash = None
        return SiloIdentity(id=silo.id, name=silo.name, role=silo.role)

    def revoke(self, name: str) -> SiloInfo:
        with self._database.transaction() as session:
            silo = session.scalars(select(Silo).where(Silo.name == name)).first()
            if silo is None:
                raise NotFoundError(f"no silo named {name!r}")
            silo.revoked = True
            silo.enrollment_token_hash = None
            return _info(silo)

    def list(self) -> list[SiloInfo]:
        with self._database.read() as session:
            return [_info(s) for s in session.scalars(select(Silo).order_by(Silo.name))]
