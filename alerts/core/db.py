"""Database access: engines, transactions, the dry-run wrapper, phase locks and
migrations.

Phases never open connections themselves: they ask a ``Database`` for
``transaction()``. In a normal run each call is its own committed transaction; in a dry
run every call is a SAVEPOINT inside one outer transaction that is rolled back at the
end, so later phases see earlier phases' effects and nothing is kept.
"""
from __future__ import annotations

import hashlib
import logging
import select
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"  # shipped inside the package
SQLITE_BUSY_TIMEOUT_MS = 30_000
# How long ``retrying`` waits for the database to come back: 7.6 s in all, far below any
# sensible lease.
RECONNECT_PAUSES_SECONDS = (0.1, 0.5, 1.0, 2.0, 4.0)
# libpq waits for ever on a server that accepts the connection and never answers; a URL's
# own ``?connect_timeout=`` wins.
PG_CONNECT_TIMEOUT_SECONDS = 10

T = TypeVar("T")

# The count of rows an INSERT … SELECT made is read after its cursor closed; psycopg 3,
# unlike psycopg2, forgets it then unless SQLAlchemy keeps it.
ENGINE_OPTIONS = {"preserve_rowcount": True}


class NotMigrated(RuntimeError):
    """The database schema is missing or behind the code."""


def make_engine(url: str, *, connect_timeout: int = PG_CONNECT_TIMEOUT_SECONDS, prepared_statements: bool = True,
                **kwargs) -> Engine:
    """``prepared_statements=False`` (ALERTS_DB_PREPARED_STATEMENTS=off) for a
    transaction-pooling PgBouncer that does not track them: statements prepared on one
    server connection would meet another client there ("prepared statement \"_pg3_0\"
    already exists") or be missing on the next.

    A pooled PostgreSQL connection is checked at checkout without a round trip (no
    ``pool_pre_ping``): one the server closed while it sat idle is replaced
    (``_closed_by_server``), and ``Database.run`` runs a statement again on a fresh
    connection when its connection died anyway."""
    url_obj = sa.engine.make_url(url)
    if url_obj.get_backend_name() == "sqlite":
        engine = sa.create_engine(url_obj, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
        _configure_sqlite(engine)
        return engine
    if url_obj.get_backend_name() == "postgresql":
        if url_obj.drivername == "postgresql":
            # psycopg 3, not SQLAlchemy's default psycopg2: it prepares a statement on the
            # server once it has run five times on a connection (``prepare_threshold``), so
            # PostgreSQL stops planning the sender's claim, load and record on every send
            # (docs/decisions.md, "Why psycopg 3").
            url_obj = url_obj.set(drivername="postgresql+psycopg")
        connect_args = {} if "connect_timeout" in url_obj.query else {"connect_timeout": connect_timeout}
        if not prepared_statements:
            connect_args["prepare_threshold"] = None  # psycopg's own switch: never prepare
        kwargs["connect_args"] = {**connect_args, **kwargs.get("connect_args", {})}
    # READ COMMITTED is stated, not assumed: a sender's load must see every digest item
    # Phase D committed before the claim in the same transaction shut it out, which a
    # REPEATABLE READ default would hide.
    kwargs.setdefault("isolation_level", "READ COMMITTED")
    engine = sa.create_engine(url_obj, execution_options=ENGINE_OPTIONS, **kwargs)
    event.listen(engine, "checkout", _closed_by_server)
    return engine


def _closed_by_server(dbapi_connection, _record, _proxy) -> None:
    """SQLAlchemy's pessimistic disconnect handling, without the pre-ping's round trip:
    an idle connection has nothing to read unless the server sent its farewell (a
    restart, ``pg_terminate_backend``, an idle timeout) or closed the socket. Raising
    DisconnectionError makes the pool replace it with a fresh one."""
    pgconn = dbapi_connection.pgconn
    try:
        readable, _, _ = select.select([pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        raise sa.exc.DisconnectionError("the connection's socket is gone") from None
    if readable or pgconn.status != psycopg.pq.ConnStatus.OK:
        raise sa.exc.DisconnectionError("the server closed the connection while it sat in the pool")


def _configure_sqlite(engine: Engine) -> None:
    """Let SQLAlchemy, not pysqlite, drive transactions so SAVEPOINTs work, and take the
    write lock at BEGIN so concurrent processes queue on busy_timeout instead of failing
    with 'database is locked' when a reader upgrades."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def connection_problem(exc: BaseException) -> str:
    """The first line of the driver's own words for a failed connection ("Connection
    refused", "database \"x\" does not exist", "timeout expired") — never the URL."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return (lines[0].strip() if lines else "") or type(orig).__name__


def is_postgres(bind: Connection | Engine) -> bool:
    return bind.dialect.name == "postgresql"


class Database:
    """What a phase gets: a way to run transactions, and whether this is a dry run."""

    def __init__(self, engine: Engine, *, _dry_conn: Connection | None = None):
        self.engine = engine
        self._dry_conn = _dry_conn

    @property
    def dry_run(self) -> bool:
        return self._dry_conn is not None

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        if self._dry_conn is not None:
            with self._dry_conn.begin_nested():
                yield self._dry_conn
        else:
            with self.engine.begin() as conn:
                yield conn

    def run(self, statements: Callable[[Connection], T]) -> T:
        """``statements(conn)`` on a connection where each statement commits on its own
        (autocommit): one round trip each, no BEGIN, no COMMIT — the send path's claim,
        load and record. For statements that are safe to run twice (a claim that already
        took its rows takes nothing more, a read, a write fenced on its claim): one that
        fails because the pooled connection it got was dead (the server restarted or
        ended it while it sat idle) is run once more on a fresh connection. In a dry run
        and on SQLite, a ``transaction()``."""
        if self._dry_conn is not None or not self.is_postgres:  # SQLite: in-process, no round trips
            with self.transaction() as conn:
                return statements(conn)
        for last in (False, True):
            try:
                with self.engine.connect() as conn:
                    return statements(conn.execution_options(isolation_level="AUTOCOMMIT"))
            except sa.exc.DBAPIError as exc:
                if last or not exc.connection_invalidated:
                    raise
                log.info("a pooled database connection was closed by the server (%s); using a fresh one",
                         type(exc.orig).__name__)
        raise AssertionError("unreachable")

    @classmethod
    @contextmanager
    def dry_run_of(cls, engine: Engine) -> Iterator["Database"]:
        """A Database whose every transaction is rolled back at the end."""
        with engine.connect() as conn:
            outer = conn.begin()
            try:
                yield cls(engine, _dry_conn=conn)
            finally:
                outer.rollback()

    @contextmanager
    def phase_lock(self, name: str) -> Iterator[bool]:
        """Hold the advisory lock of a phase for the duration of the block.

        Yields False when another process holds it. The lock is transaction-level, taken
        on its own connection whose transaction stays open until the block ends, so it
        also works behind a transaction-pooling PgBouncer. SQLite has a single writer and
        needs no lock.
        """
        if not self.is_postgres:
            yield True
            return
        with self.engine.connect() as conn:
            with conn.begin():
                got = conn.execute(
                    sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": lock_key(name)}
                ).scalar()
                yield bool(got)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key per phase name."""
    digest = hashlib.sha256(f"energyriskiq-alerts:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# --- riding out a dropped connection -------------------------------------------------

def retrying(write: Callable[[], T], what: str) -> T:
    """``write()`` — a transaction of its own — run again on a fresh connection when the
    database dropped the connection or could not be reached (a restart, a failover,
    pg_terminate_backend), for up to ``sum(RECONNECT_PAUSES_SECONDS)`` seconds.

    For the writes that must not be lost after a message went out: an outcome that
    cannot be written leaves its row in ``sending``, and the row would be sent a second
    time after the lease although this process knows it was sent. The writes given here
    are fenced on their claim, so one repeated after a lost reply changes nothing.
    """
    for pause in (*RECONNECT_PAUSES_SECONDS, None):
        try:
            return write()
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            if pause is None:
                raise
            log.warning("%s: database error (%s); trying again in %ss", what, type(exc.orig).__name__, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


# --- migrations -----------------------------------------------------------------------

def alembic_config(url: str | None = None, *, prepared_statements: bool = True):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["prepared_statements"] = prepared_statements  # read by migrations/env.py
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, *, prepared_statements: bool = True) -> str:
    """Bring the database to head; safe to run again. Returns the head revision."""
    from alembic import command

    cfg = alembic_config(url, prepared_statements=prepared_statements)
    command.upgrade(cfg, "head")
    return head_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_migrated(engine: Engine) -> None:
    """Raise NotMigrated unless the database is at the head revision."""
    head = head_revision()
    current = current_revision(engine)
    if current != head:
        state = "has no schema" if current is None else f"is at revision {current}, code expects {head}"
        raise NotMigrated(f"the database {state}: run `alerts migrate` first")
