"""Alembic environment: runs migrations with the URL `alerts migrate` passes in
(or DATABASE_URL when alembic is called directly)."""
import os

from alembic import context

from alerts.core.db import make_engine

config = context.config


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL", "sqlite:///alerts.db")
    engine = make_engine(url, prepared_statements=config.attributes.get("prepared_statements", True))
    with engine.connect() as connection:
        context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `alerts migrate`")
run_migrations_online()
