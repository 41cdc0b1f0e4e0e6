"""Who is calling: what a call presents, the identities it can prove, and the `Authenticator` seam.

Two authenticators: `TokenAuthenticator` (plaintext: silos send a bearer credential, stored only as a sha256
digest; JobService is open) and `coordinator.certificates.CertificateAuthenticator` (mTLS: every identity
comes from the client certificate the handshake verified). Neither ever takes an identity from a request field.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from cryptography import x509
from sqlalchemy import select

from coordinator.store.database import Database
from coordinator.store.models import Silo
from fedmeki_core.errors import AuthenticationError, ForbiddenError, InvalidInputError
from fedmeki_core.kits import certificate_identity
from fedmeki_core.recent import Recent

METADATA_KEY = "authorization"
_SCHEME = "Bearer "
_PEM_PROPERTY = "x509_pem_cert"  # the verified peer certificate in gRPC's auth context


def new_secret(prefix: str) -> str:
    """A random secret with a readable prefix (never starting with '-', which a command line would misread)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class PeerCredentials:
    """What one call presents: where it comes from, its metadata and, over TLS, its verified certificate."""

    peer: str
    metadata: Sequence[tuple[str, str | bytes]]
    certificate: x509.Certificate | None = None

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext[Any, Any]) -> PeerCredentials:
        pems = context.auth_context().get(_PEM_PROPERTY) or []
        return cls(
            peer=str(context.peer()),
            metadata=tuple(context.invocation_metadata() or ()),
            certificate=x509.load_pem_x509_certificate(pems[0]) if pems else None,
        )

    @property
    def claimed(self) -> str:
        """Who the call says it is before any check, for the audit of a refusal: a certificate's role:name."""
        if self.certificate is None:
            return "unknown"
        try:
            return certificate_identity(self.certificate).label
        except InvalidInputError:
            return "unknown"


@dataclass(frozen=True)
class SiloIdentity:
    id: str
    name: str
    role: str = "trainer"  # "injector": runs the injection stage instead of training rounds

    @property
    def label(self) -> str:
        return f"silo:{self.name}"


@dataclass(frozen=True)
class Principal:
    """Who makes a JobService call: a researcher or an admin named by their certificate, or, on a plaintext
    coordinator, nobody in particular (`ANONYMOUS`, allowed everything, as the plaintext warning says)."""

    label: str  # "researcher:NAME", "admin:NAME" or "anonymous"
    manages_all_jobs: bool  # may cancel any researcher's job, not only its own


ANONYMOUS = Principal(label="anonymous", manages_all_jobs=True)


class Authenticator(Protocol):
    """Turns what a call presents into an identity. Raises AuthenticationError when there is no identity or an
    unknown one, ForbiddenError when a known identity may not make the call (wrong role, revoked)."""

    def silo(self, call: PeerCredentials) -> SiloIdentity: ...

    def researcher(self, call: PeerCredentials) -> Principal: ...

    def enrollment(self, call: PeerCredentials) -> None:
        """Whether the call may exchange an enrollment token for a credential."""
        ...


class TokenAuthenticator:
    """Plaintext mode: silos by their `authorization: Bearer <credential>` metadata; JobService open to anyone.

    A credential found valid is trusted for at most `cache_seconds` (by its digest) without another read of the
    database: each silo calls several times a round, and a read per call was a large part of the coordinator's work
    with hundreds of silos. The trusted credentials are checked again together, in one read, once `cache_seconds`
    have passed since the last such check, so a revocation, written by the operator's CLI in another process, takes
    effect within `cache_seconds`. Unknown and revoked credentials are never cached: a refusal always reads the
    database. At most `max_cached` credentials are trusted at once (the least recently used goes first).
    """

    def __init__(
        self,
        database: Database,
        cache_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = 4096,
    ) -> None:
        self._database = database
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._verified: Recent[str, SiloIdentity] = Recent(max_cached)  # credential digest -> identity
        self._checked_at = -math.inf  # when every entry of `_verified` was last found valid
        self._lock = threading.Lock()

    def silo(self, call: PeerCredentials) -> SiloIdentity:
        values = [value for key, value in call.metadata if key == METADATA_KEY]
        if not values or not isinstance(values[0], str) or not values[0].startswith(_SCHEME):
            raise AuthenticationError("missing silo credential: send 'authorization: Bearer <credential>'")
        key = digest(values[0][len(_SCHEME) :])
        if self._cache_seconds <= 0:
            return self._read(key)
        with self._lock:
            if self._clock() >= self._checked_at + self._cache_seconds:
                self._check_again()
            identity = self._verified.get(key)
            if identity is not None:
                return identity
            checked_at = self._checked_at
        identity = self._read(key)
        with self._lock:
            # Only valid credentials get here, trusted until the next check of them all: for less than the bound,
            # unless that check ran while this one read (its read may be the older one).
            if self._checked_at == checked_at:
                self._verified.put(key, identity)
        return identity

    def _check_again(self) -> None:
        """Keep the trusted credentials still valid, from one read of them all (under the lock: one caller reads,
        the others wait for it rather than read each its own)."""
        now = self._clock()
        if self._verified:
            query = select(Silo.credential_hash, Silo.id, Silo.name, Silo.role).where(
                Silo.credential_hash.in_(list(self._verified)), Silo.revoked.is_(False)
            )
            with self._database.read() as session:
                rows = session.execute(query).all()
            valid = {key: SiloIdentity(id=id_, name=name, role=role) for key, id_, name, role in rows}
            for key in self._verified:
                if valid.get(key) != self._verified.get(key):
                    self._verified.pop(key)
        self._checked_at = now

    def _read(self, credential_digest: str) -> SiloIdentity:
        with self._database.read() as session:
            silo = session.scalars(select(Silo).where(Silo.credential_hash == credential_digest)).first()
        if silo is None:
            raise AuthenticationError("unknown silo credential")
        if silo.revoked:
            raise ForbiddenError(f"silo {silo.name!r} has been revoked")
        return SiloIdentity(id=silo.id, name=silo.name, role=silo.role)

    def researcher(self, call: PeerCredentials) -> Principal:
        return ANONYMOUS

    def enrollment(self, call: PeerCredentials) -> None:
        return None  # the one-time token is the credential
