"""A silo's verified credential is trusted for `credential_cache_seconds` without a database read (issue 20); a
revocation written by another process (the operator's CLI) takes effect within that bound, and a refusal is never
cached. The trusted credentials are checked again in one read, and only so many are trusted at once."""

from __future__ import annotations

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection

from coordinator.credentials import METADATA_KEY, PeerCredentials, TokenAuthenticator
from coordinator.silos import SiloRegistry
from coordinator.store.database import Database
from fedmeki_core.errors import AuthenticationError, ForbiddenError

BOUND = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _presenting(credential: str) -> PeerCredentials:
    return PeerCredentials(peer="ipv4:127.0.0.1:1", metadata=((METADATA_KEY, f"Bearer {credential}"),))


def _enrolled(database: Database, name: str) -> str:
    registry = SiloRegistry(database)
    _, token = registry.add(name)
    return registry.enroll(token).credential


def test_a_revocation_by_another_process_is_refused_within_the_bound(database_url: str) -> None:
    coordinator_db, operator_db = Database(database_url), Database(database_url)  # two engines, as two processes
    coordinator_db.migrate()
    try:
        credential = _enrolled(operator_db, "hospital")
        clock = Clock()
        cached = TokenAuthenticator(coordinator_db, cache_seconds=BOUND, clock=clock)
        uncached = TokenAuthenticator(coordinator_db)
        assert cached.silo(_presenting(credential)).name == "hospital"
        assert uncached.silo(_presenting(credential)).name == "hospital"

        SiloRegistry(operator_db).revoke("hospital")
        with pytest.raises(ForbiddenError, match="has been revoked"):
            uncached.silo(_presenting(credential))  # without a cache: at once
        clock.now += BOUND - 0.1
        assert cached.silo(_presenting(credential)).name == "hospital"  # the documented staleness
        clock.now += 0.1
        for _ in range(2):  # refused, and the refusal is not cached either
            with pytest.raises(ForbiddenError, match="has been revoked"):
                cached.silo(_presenting(credential))
    finally:
        coordinator_db.dispose()
        operator_db.dispose()


def test_an_unknown_credential_is_not_remembered(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    try:
        authenticator = TokenAuthenticator(database, cache_seconds=BOUND, clock=Clock())
        with pytest.raises(AuthenticationError, match="missing silo credential"):
            authenticator.silo(PeerCredentials(peer="ipv4:127.0.0.1:1", metadata=()))
        with pytest.raises(AuthenticationError, match="unknown silo credential"):
            authenticator.silo(_presenting("fmk-silo_guess"))
        credential = _enrolled(database, "late")
        assert authenticator.silo(_presenting(credential)).name == "late"  # a silo enrolled a moment ago
    finally:
        database.dispose()


def test_the_trusted_credentials_are_checked_again_together_in_one_read(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    try:
        credentials = [_enrolled(database, f"hospital-{i}") for i in range(3)]
        clock = Clock()
        authenticator = TokenAuthenticator(database, cache_seconds=BOUND, clock=clock)
        for credential in credentials:
            authenticator.silo(_presenting(credential))
        SiloRegistry(database).revoke("hospital-1")
        clock.now += BOUND
        began: list[int] = []

        def begin(connection: Connection) -> None:
            began.append(1)

        event.listen(database.engine, "begin", begin)
        try:
            assert authenticator.silo(_presenting(credentials[0])).name == "hospital-0"
            assert authenticator.silo(_presenting(credentials[2])).name == "hospital-2"
        finally:
            event.remove(database.engine, "begin", begin)
        assert len(began) == 1  # the check of all three, not one read each
        with pytest.raises(ForbiddenError, match="has been revoked"):
            authenticator.silo(_presenting(credentials[1]))
    finally:
        database.dispose()


def test_at_most_max_cached_credentials_are_trusted(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    try:
        credentials = [_enrolled(database, f"hospital-{i}") for i in range(3)]
        authenticator = TokenAuthenticator(database, cache_seconds=BOUND, clock=Clock(), max_cached=2)
        for credential in credentials:
            authenticator.silo(_presenting(credential))
        SiloRegistry(database).revoke("hospital-0")
        SiloRegistry(database).revoke("hospital-2")
        # The least recently used went first: read again, refused at once; the most recent is within the bound.
        with pytest.raises(ForbiddenError, match="has been revoked"):
            authenticator.silo(_presenting(credentials[0]))
        assert authenticator.silo(_presenting(credentials[2])).name == "hospital-2"
    finally:
        database.dispose()
