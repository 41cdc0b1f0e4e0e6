"""The coordinator's database: SQLAlchemy models, engine set-up with Alembic migrations, read views."""

from coordinator.store.database import Database, default_sqlite_url

__all__ = ["Database", "default_sqlite_url"]
