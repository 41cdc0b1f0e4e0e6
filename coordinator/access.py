"""AccessControl: every RPC's (and dashboard request's) first step. Who is calling, may their role make this call;
each refusal audited.

SiloService calls need a silo identity, JobService calls a researcher's or an admin's (`Authenticator` decides
how: bearer tokens and an open JobService in plaintext, certificates over mTLS). A refused call has changed
nothing when it is refused: the servicers ask before they read the request's payload. It reads the database: the
servicers call it on the blocking pool, with what the call presented (`PeerCredentials.of`, read on the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from coordinator.audit import AuditLog
from coordinator.credentials import Authenticator, PeerCredentials, Principal, SiloIdentity
from fedmeki_core.errors import FedmekiError

T = TypeVar("T")


class AccessControl:
    def __init__(self, authenticator: Authenticator, audit: AuditLog) -> None:
        self._authenticator = authenticator
        self._audit = audit

    def silo(self, call: PeerCredentials, action: str, job_id: str = "") -> SiloIdentity:
        return self._checked(call, action, job_id, self._authenticator.silo)

    def researcher(self, call: PeerCredentials, action: str, job_id: str = "") -> Principal:
        return self._checked(call, action, job_id, self._authenticator.researcher)

    def reader(self, call: PeerCredentials, action: str) -> Principal:
        """A researcher's or an admin's identity for a call that is not gRPC (the dashboard's HTTP requests)."""
        return self._checked(call, action, "", self._authenticator.researcher)

    def enrollment(self, call: PeerCredentials, action: str) -> None:
        self._checked(call, action, "", self._authenticator.enrollment)

    def _checked(self, call: PeerCredentials, action: str, job_id: str, check: Callable[[PeerCredentials], T]) -> T:
        try:
            return check(call)
        except FedmekiError as exc:
            self._audit.refusal(action, call.claimed, call.peer, exc, job_id)
            raise
