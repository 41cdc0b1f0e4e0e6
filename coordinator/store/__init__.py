"""The coordinator's database: SQLAlchemy models, engine set-up with Alembic migrations, read views."""
