"""mTLS identities: the `CertificateAuthenticator`, and the revocation list of certificate serials.

The TLS handshake has already checked the certificate's chain to the project CA and its validity period (a
foreign, expired or missing certificate never reaches a servicer). What is left is checked here on every call,
against the database, so that a revocation takes effect at the next call without a restart: the role the
subject names (OU) against what the call needs, the serial against the revocation list, and a silo's name (CN)
against the registered, unrevoked silos.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from coordinator.credentials import PeerCredentials, Principal, SiloIdentity
from coordinator.silos import SiloRegistry
from coordinator.store.database import Database
from coordinator.store.models import RevokedCertificate, Silo, utcnow
from fedmeki_core.errors import (
    AlreadyExistsError,
    AuthenticationError,
    ForbiddenError,
    InvalidInputError,
    PreconditionError,
)
from fedmeki_core.kits import CertificateIdentity, Role, certificate_identity, serial_text


@dataclass(frozen=True)
class RevokedInfo:
    serial: str
    subject: str
    reason: str
    revoked_at: datetime


class RevocationList:
    """Serials of certificates refused from now on, whoever they name."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def revoke(self, serial: int, subject: str = "", reason: str = "") -> RevokedInfo:
        """Refuse the certificate from its next call on. A silo's certificate (subject `silo:NAME`) revokes that
        silo in the same transaction, so that no round selects it or waits for it from now on."""
        with self._database.transaction() as session:
            if session.get(RevokedCertificate, serial_text(serial)) is not None:
                raise AlreadyExistsError(f"certificate {serial_text(serial)} is already revoked")
            row = RevokedCertificate(serial=serial_text(serial), subject=subject, reason=reason, revoked_at=utcnow())
            session.add(row)
            role, _, name = subject.partition(":")
            if role == Role.SILO.value:
                session.execute(update(Silo).where(Silo.name == name).values(revoked=True, enrollment_token_hash=None))
            return RevokedInfo(row.serial, row.subject, row.reason, row.revoked_at)

    def is_revoked(self, serial: int) -> bool:
        with self._database.read() as session:
            return session.get(RevokedCertificate, serial_text(serial)) is not None

    def list(self) -> list[RevokedInfo]:
        with self._database.read() as session:
            rows = session.scalars(select(RevokedCertificate).order_by(RevokedCertificate.revoked_at))
            return [RevokedInfo(r.serial, r.subject, r.reason, r.revoked_at) for r in rows]


class CertificateAuthenticator:
    """mTLS mode: SiloService needs a silo certificate, JobService a researcher's or an admin's."""

    def __init__(self, database: Database) -> None:
        self._registry = SiloRegistry(database)
        self._revocations = RevocationList(database)

    def silo(self, call: PeerCredentials) -> SiloIdentity:
        return self._registry.certified(self._identity(call, Role.SILO).name)

    def researcher(self, call: PeerCredentials) -> Principal:
        identity = self._identity(call, Role.RESEARCHER, Role.ADMIN)
        return Principal(label=identity.label, manages_all_jobs=identity.role == Role.ADMIN)

    def enrollment(self, call: PeerCredentials) -> None:
        self._identity(call, Role.SILO)
        raise PreconditionError(
            "this coordinator identifies silos by their startup-kit certificates: there is no token to enroll; "
            "start the agent with fedmeki-silo run --kit"
        )

    def _identity(self, call: PeerCredentials, *roles: Role) -> CertificateIdentity:
        if call.certificate is None:
            raise AuthenticationError("no verified client certificate: connect with a startup kit")
        try:
            identity = certificate_identity(call.certificate)
        except InvalidInputError as exc:
            raise AuthenticationError(exc.message) from None
        if identity.role not in roles:
            wanted = " or ".join(role.value for role in roles)
            raise ForbiddenError(
                f"this call needs a {wanted} certificate; it presents the {identity.role.value} certificate "
                f"of {identity.name!r}"
            )
        if self._revocations.is_revoked(identity.serial):
            raise ForbiddenError(f"certificate {serial_text(identity.serial)} ({identity.label}) has been revoked")
        return identity
