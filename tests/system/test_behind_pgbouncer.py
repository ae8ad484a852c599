"""Behind a connection pooler: with ALERTS_DB_PREPARED_STATEMENTS=off the commands work
through a PgBouncer in transaction pooling mode that does not track prepared statements
(Debian's 1.18); with the default (on) psycopg prepares statements on server connections
the pooler shares, and the next client there meets them.

Each test starts a PgBouncer of its own in front of the tests' PostgreSQL. .ci/run also
runs the concurrency, Celery and instant-path tests once more behind one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from alerts.core.db import make_engine
from tests.conftest import PG_ADMIN_URL
from tests.support.e2e_runner import ROOT, RUN_TIMEOUT_SECONDS, runner_env
from tests.support.factories import add_event, add_pref, add_user
from tests.support.private_postgres import free_port

PGBOUNCER = shutil.which("pgbouncer") or next(filter(os.path.exists, ["/usr/sbin/pgbouncer"]), None)
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed (Debian: apt-get install "
                                                         "pgbouncer; .ci/run does)")
READERS, EVENTS_PER_RUN = 5, 6


class PgBouncer:
    """PgBouncer in transaction pooling mode on a free port, in front of ``server_url``."""

    def __init__(self, server_url: str):
        server = sa.engine.make_url(server_url)
        self.directory = Path(tempfile.mkdtemp(prefix="alerts-test-pgbouncer-"))
        self.port = free_port()
        (self.directory / "userlist.txt").write_text(f'"{server.username}" ""\n')
        (self.directory / "pgbouncer.ini").write_text(
            f"[databases]\n* = host={server.host} port={server.port or 5432}\n\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.directory}/userlist.txt\npool_mode = transaction\n"
            f"default_pool_size = 10\nlogfile = {self.directory}/pgbouncer.log\n")
        command = [PGBOUNCER, str(self.directory / "pgbouncer.ini")]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            shutil.chown(self.directory, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url_of = lambda name: server.set(port=self.port, database=name).render_as_string(hide_password=False)
        deadline = time.monotonic() + 30
        while subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def pooled_database():
    """An empty database of its own (never one a pooler has served before), and the
    URL that reaches it through a fresh PgBouncer."""
    name = f"alerts_pooled_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    bouncer = PgBouncer(PG_ADMIN_URL)
    yield bouncer.url_of(name), sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(
        hide_password=False)
    bouncer.stop()
    with admin.connect() as conn:
        conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                             "AND pid <> pg_backend_pid()", (name,))
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


def alerts(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)


def add_work(direct_url: str, first: bool) -> None:
    """Readers (the first time) and new events for them: enough statements per run that
    psycopg would prepare some (it does after five runs of one statement)."""
    engine = make_engine(direct_url)
    with engine.begin() as conn:
        if first:
            for _ in range(READERS):
                add_pref(conn, add_user(conn))
        for _ in range(EVENTS_PER_RUN):
            add_event(conn, event_key=uuid.uuid4().hex, created_at=datetime.now(timezone.utc) - timedelta(minutes=1))
    engine.dispose()


def runs(pooled_url: str, direct_url: str, tmp_path: Path, count: int, **settings: str) -> list:
    env = runner_env(pooled_url, ALERTS_EMAIL_BACKEND="file", ALERTS_OUTBOX_DIR=str(tmp_path / "outbox"), **settings)
    migrated = alerts(["-m", "alerts", "migrate"], env)
    assert migrated.returncode == 0, migrated.stderr
    results = []
    for n in range(count):
        add_work(direct_url, first=n == 0)
        results.append(alerts(["-m", "alerts.runner", "--phase", "all", "--json"], env))
    return results


def test_with_prepared_statements_off_every_run_works_behind_a_transaction_pooler(pooled_database, tmp_path):
    pooled_url, direct_url = pooled_database
    results = runs(pooled_url, direct_url, tmp_path, 4, ALERTS_DB_PREPARED_STATEMENTS="off")

    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    env = runner_env(pooled_url, ALERTS_DB_PREPARED_STATEMENTS="off")
    for command in (["status"], ["check"]):
        result = alerts(["-m", "alerts", *command], env)
        assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 4 * EVENTS_PER_RUN * READERS


def test_with_prepared_statements_on_a_run_meets_a_statement_another_client_prepared(pooled_database, tmp_path):
    """Why the setting exists: what Debian's PgBouncer does to psycopg's defaults."""
    pooled_url, direct_url = pooled_database
    results = runs(pooled_url, direct_url, tmp_path, 3, ALERTS_DB_PREPARED_STATEMENTS="on")

    failed = [r for r in results if r.returncode != 0]
    assert failed, "a run meets server connections an earlier client prepared statements on"
    assert failed[0].returncode == 3 and 'prepared statement "_pg3_' in failed[0].stderr


def test_an_unknown_value_exits_2_naming_the_variable(tmp_path):
    result = alerts(["-m", "alerts", "status"], runner_env(f"sqlite:///{tmp_path / 'x.db'}",
                                                           ALERTS_DB_PREPARED_STATEMENTS="sometimes"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("Error: configuration error: ALERTS_DB_PREPARED_STATEMENTS: must be one of on, "
                                     "off (got 'sometimes')")


@pytest.mark.skipif(os.environ.get("ALERTS_DB_PREPARED_STATEMENTS", "").lower() == "off",
                    reason="with the variable off in the environment, the tests' own connections prepare nothing")
def test_off_makes_psycopg_prepare_nothing(pg_url):
    prepared = make_engine(pg_url)
    unprepared = make_engine(pg_url, prepared_statements=False)
    with prepared.connect() as on, unprepared.connect() as off:
        for conn in (on, off):
            for _ in range(10):
                conn.execute(sa.text("SELECT count(*) FROM users WHERE id > :id"), {"id": 0})
        counts = [conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar_one()
                  for conn in (on, off)]
    prepared.dispose()
    unprepared.dispose()
    assert counts[0] >= 1 and counts[1] == 0
