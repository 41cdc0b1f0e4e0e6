"""Silo credentials: random bearer secrets, stored only as sha256 digests.

The identity of a SiloService call comes from its credential, never from a request field. mTLS will add a
second `SiloAuthenticator` that reads the verified client certificate instead.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select

from coordinator.store.database import Database
from coordinator.store.models import Silo
from fedmeki_core.errors import AuthenticationError, ForbiddenError

METADATA_KEY = "authorization"
_SCHEME = "Bearer "


def new_secret(prefix: str) -> str:
    """A random secret with a readable prefix (never starting with '-', which a command line would misread)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class SiloIdentity:
    id: str
    name: str
    role: str = "trainer"  # "injector": runs the injection stage instead of training rounds


class SiloAuthenticator(Protocol):
    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> SiloIdentity: ...


class TokenAuthenticator:
    """Checks the `authorization: Bearer <credential>` metadata against the stored digests."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> SiloIdentity:
        values = [value for key, value in metadata if key == METADATA_KEY]
        if not values or not isinstance(values[0], str) or not values[0].startswith(_SCHEME):
            raise AuthenticationError("missing silo credential: send 'authorization: Bearer <credential>'")
        credential = values[0][len(_SCHEME) :]
        with self._database.read() as session:
            silo = session.scalars(select(Silo).where(Silo.credential_hash == digest(credential))).first()
        if silo is None:
            raise AuthenticationError("unknown silo credential")
        if silo.revoked:
            raise ForbiddenError(f"silo {silo.name!r} has been revoked")
        return SiloIdentity(id=silo.id, name=silo.name, role=silo.role)
