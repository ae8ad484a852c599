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
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


class NotMigrated(RuntimeError):
    """The database schema is missing or behind the code."""


def make_engine(url: str, **kwargs) -> Engine:
    url_obj = sa.engine.make_url(url)
    if url_obj.get_backend_name() == "sqlite":
        engine = sa.create_engine(url_obj, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
        _configure_sqlite(engine)
        return engine
    if url_obj.get_backend_name() == "postgresql" and url_obj.drivername == "postgresql":
        url_obj = url_obj.set(drivername="postgresql+psycopg2")
    return sa.create_engine(url_obj, pool_pre_ping=True, **kwargs)


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


# --- statements sent together, prepared once per connection -------------------------

class Script:
    """Statements PostgreSQL runs one after another in one round trip, as one implicit
    transaction — all or nothing — each with a snapshot of its own (READ COMMITTED).

    On each connection the statements are prepared (PREPARE) on first use and run with
    EXECUTE from then on, so the server parses and plans them once instead of on every
    send: most of what a one-row claim or outcome costs the server. Where a connection
    cannot keep prepared statements — a transaction-pooling PgBouncer, which hands each
    round trip to any server connection — the script notices (the statement is missing,
    or already there) and sends its plain SQL on that connection from then on.

    ``preamble``: plain SQL sent first (what cannot be prepared, e.g. SET TRANSACTION).
    Parameters are named; a name may appear in several statements, with one value.
    ``run`` returns the last statement's rows, typed like its columns, and row count.
    Only for connections in autocommit mode: a failed PREPARE inside a transaction would
    abort it.
    """

    _dialect = None

    def __init__(self, name: str, *statements: sa.Executable, preamble: str = ""):
        dialect = self._postgres_dialect()
        self.name, self.preamble = name, preamble
        plain, prepare, execute = [preamble] if preamble else [], [], [preamble] if preamble else []
        self._bind_processors: dict[str, object] = {}
        self._fixed: dict[str, object] = {}  # values written into the statements themselves
        for n, statement in enumerate(statements):
            compiled = statement.compile(dialect=dialect)
            if "%%" in compiled.string:
                raise ValueError(f"{name}: a literal % cannot be prepared as written")
            names: list[str] = []

            def rename(match: re.Match) -> str:
                bind = compiled.binds[match.group(1)]
                impl = bind.type.dialect_impl(dialect)
                if not bind.required:
                    # A value fixed in the statement ('queued', NULL) is written in as
                    # a literal, so the plan can use the partial indexes it matches.
                    literal = impl.literal_processor(dialect)
                    if bind.effective_value is None:
                        return "NULL"
                    if literal is not None:
                        return literal(bind.effective_value)
                    key = f"s{n}_{match.group(1)}"
                    self._fixed[key] = bind.effective_value
                else:
                    key = bind.key
                processor = impl.bind_processor(dialect)
                if processor is not None:
                    self._bind_processors[key] = processor
                if key not in names:
                    names.append(key)
                return f"%({key})s"

            sql = _PYFORMAT.sub(rename, compiled.string)
            prepared_name = f"alerts_{name}_{n}"
            plain.append(sql)
            prepare.append(f"PREPARE {prepared_name} AS "
                           + _PYFORMAT.sub(lambda match: f"${names.index(match.group(1)) + 1}", sql))
            execute.append(f"EXECUTE {prepared_name}({', '.join(f'%({key})s' for key in names)})"
                           if names else f"EXECUTE {prepared_name}")
        self._plain, self._prepare, self._execute = "; ".join(plain), "; ".join(prepare), "; ".join(execute)
        last = statements[-1]
        columns = list(getattr(last, "selected_columns", ()))
        self._keys = [column.key for column in columns]
        self._result_processors = [column.type.dialect_impl(dialect).result_processor(dialect, None)
                                   for column in columns]

    @classmethod
    def _postgres_dialect(cls):
        if cls._dialect is None:
            from sqlalchemy.dialects.postgresql import psycopg2

            cls._dialect = psycopg2.dialect()
        return cls._dialect

    def run(self, conn: Connection, params: dict) -> tuple[list[dict], int]:
        params = {key: (self._bind_processors[key](value) if key in self._bind_processors else value)
                  for key, value in {**self._fixed, **params}.items()}
        state = conn.connection.info.setdefault(_PREPARED_KEY, {"names": set(), "off": False})
        if not state["off"]:
            try:
                if self.name not in state["names"]:
                    conn.exec_driver_sql(self._prepare)
                    state["names"].add(self.name)
                return self._rows(conn.exec_driver_sql(self._execute, params))
            except sa.exc.DBAPIError as exc:
                if getattr(exc.orig, "pgcode", None) not in _PREPARED_STATEMENT_TROUBLE:
                    raise
                # Nothing ran (the round trip failed as a whole): go plain on this connection.
                log.info("prepared statements do not stick on this connection (%s); sending plain SQL",
                         type(exc.orig).__name__)
                state["off"] = True
        return self._rows(conn.exec_driver_sql(self._plain, params))

    def _rows(self, result) -> tuple[list[dict], int]:
        if not self._keys:
            return [], result.rowcount
        rows = [{key: (process(value) if process is not None else value)
                 for key, process, value in zip(self._keys, self._result_processors, raw)}
                for raw in result.fetchall()]
        return rows, result.rowcount


_PYFORMAT = re.compile(r"%\((\w+)\)s")
_PREPARED_KEY = "alerts.prepared_scripts"
# invalid_sql_statement_name (EXECUTE of a statement this server connection lacks),
# duplicate_prepared_statement (PREPARE of one it already has).
_PREPARED_STATEMENT_TROUBLE = ("26000", "42P05")


# --- migrations -----------------------------------------------------------------------

def alembic_config(url: str | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> str:
    """Bring the database to head; safe to run again. Returns the head revision."""
    from alembic import command

    cfg = alembic_config(url)
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
