"""Shared fixtures: real databases (PostgreSQL and SQLite), a real Redis, settings.

The functional suite runs on both databases through the parametrised ``db_url``
fixture; tests that need PostgreSQL-only behaviour (SKIP LOCKED, advisory locks, several
processes) use ``pg_url``. Redis is a private ``redis-server`` per test session, on a
free port, so test runs side by side never share (or flush) each other's queues.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from alerts.core.settings import Settings
from alerts.core.db import Database, make_engine, migrate

pytest_plugins = ["tests.support.fakes.fixtures"]

PG_ADMIN_URL = os.environ.get("ALERTS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# Behind a connection pooler (.ci/run runs the concurrency and Celery tests once more
# through PgBouncer in transaction mode, with ALERTS_TEST_PG_ADMIN_URL pointing at it):
# ALERTS_DB_PREPARED_STATEMENTS=off in the environment makes this process's own
# connections prepare nothing either (tests build Settings without the environment), and
# the processes the tests start keep it (tests/support/e2e_runner.py, KEPT_VARIABLES).
if os.environ.get("ALERTS_DB_PREPARED_STATEMENTS", "").strip().lower() == "off":
    @sa.event.listens_for(sa.engine.Engine, "connect")
    def _prepare_nothing(dbapi_conn, _record):
        if hasattr(dbapi_conn, "prepare_threshold"):  # psycopg 3, not sqlite3
            dbapi_conn.prepare_threshold = None


def _pg_url(dbname: str) -> str:
    return sa.engine.make_url(PG_ADMIN_URL).set(database=dbname).render_as_string(hide_password=False)


class RedisServer:
    """A ``redis-server`` of this test session's own (nothing on disk)."""

    def __init__(self, directory):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_database():
    """A fresh, migrated PostgreSQL database for this test session, dropped at the end."""
    name = f"alerts_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = _pg_url(name)
    migrate(url)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


def _truncate_pg(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        tables = conn.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename NOT IN ('alembic_version', 'installation')"
        ).scalars().all()
        if tables:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    engine.dispose()


@pytest.fixture
def pg_url(pg_database):
    """PostgreSQL URL with every table emptied before the test."""
    _truncate_pg(pg_database)
    return pg_database


@pytest.fixture
def conn(pg_url):
    """A PostgreSQL connection of the test's own, in autocommit: every statement is
    committed at once, as another process would see it."""
    engine = make_engine(pg_url)
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        yield connection
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template, tmp_path):
    path = tmp_path / "alerts.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request):
    """The functional suite runs once per database."""
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def db(engine):
    return Database(engine)


@pytest.fixture
def settings(db_url, tmp_path):
    """Settings with no channel configured; tests add what they need with replace()."""
    return Settings.from_env({"DATABASE_URL": db_url, "ALERTS_OUTBOX_DIR": str(tmp_path / "outbox")})


@pytest.fixture
def now():
    return datetime(2026, 5, 12, 12, 0, tzinfo=timezone.utc)
