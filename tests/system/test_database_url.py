"""docs/operations.md: a database that cannot be reached is one line naming DATABASE_URL and the
cause — never the password — and exit 3; an unsupported kind exits 2; ``postgres://``
works as ``postgresql://``. Real processes, as an operator runs them."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from alerts.core.settings import ConfigError, Settings

PASSWORD = "hunter2-do-not-print"
# The three ways in: the console script's commands, the runner, and migrate.
COMMANDS = {
    "alerts status": ["-m", "alerts", "status"],
    "alerts migrate": ["-m", "alerts", "migrate"],
    "runner": ["-m", "alerts.runner", "--phase", "all"],
}


def run(args, database_url: str, *, timeout: float = 60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALERTS_", "DATABASE_URL", "CELERY_"))}
    env["DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server():
    """Accepts TCP connections and never answers: a server that times out."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in accepted:
        conn.close()


def assert_one_line_exit_3(result, *needles):
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DATABASE_URL" in lines[0]
    for needle in needles:
        assert needle in lines[0]
    assert PASSWORD not in result.stderr + result.stdout


# --- unreachable: exit 3, one line ------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_a_server_that_refuses_is_one_line_naming_database_url_and_exit_3(command):
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/alerts"
    result = run(COMMANDS[command], url)
    assert_one_line_exit_3(result, "Connection refused", "postgres:***@127.0.0.1")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_database_that_does_not_exist_is_one_line_and_exit_3(command, pg_database):
    url = sa.engine.make_url(pg_database).set(password=PASSWORD, database="alerts_no_such_db")
    result = run(COMMANDS[command], url.render_as_string(hide_password=False))
    assert_one_line_exit_3(result, 'database "alerts_no_such_db" does not exist')


def test_a_password_given_as_a_query_option_is_hidden_too():
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/alerts?sslmode=disable&password={PASSWORD}"
    result = run(COMMANDS["runner"], url)
    assert_one_line_exit_3(result, "?sslmode=disable&password=***")


def test_a_server_that_never_answers_times_out_in_one_line(silent_server):
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{silent_server}/alerts?connect_timeout=1"
    result = run(COMMANDS["alerts status"], url, timeout=30)
    assert_one_line_exit_3(result, "timeout")


def test_an_unopenable_sqlite_file_is_one_line_and_exit_3(tmp_path):
    result = run(COMMANDS["runner"], f"sqlite:///{tmp_path}/no/such/dir/alerts.db")
    assert_one_line_exit_3(result, "unable to open database file")


def test_verbose_adds_the_traceback_and_still_hides_the_password():
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/alerts"
    for args in (["-m", "alerts", "-v", "status"], ["-m", "alerts.runner", "-v"], ["-m", "alerts", "run", "-v"]):
        result = run(args, url)
        assert result.returncode == 3, result.stderr
        assert "Traceback (most recent call last)" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("Error: DATABASE_URL postgresql://postgres:***@")
        assert PASSWORD not in result.stderr + result.stdout


# --- the kind of URL --------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_an_unsupported_kind_exits_2_naming_database_url(command):
    result = run(COMMANDS[command], f"mysql://root:{PASSWORD}@127.0.0.1/alerts")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "DATABASE_URL" in result.stderr and "mysql://" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


def test_postgres_scheme_works_against_the_test_database(pg_url):
    url = pg_url.replace("postgresql://", "postgres://", 1) + "?sslmode=disable&application_name=alerts-test"
    for args in (["-m", "alerts", "migrate"], ["-m", "alerts", "status", "--json"],
                 ["-m", "alerts.runner", "--phase", "all", "--json"]):
        result = run(args, url)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("given, read_as", [
    ("postgres://u:pw@db.example.com:5432/alerts?sslmode=require",
     "postgresql://u:pw@db.example.com:5432/alerts?sslmode=require"),
    ("POSTGRES://db/alerts", "postgresql://db/alerts"),
    ("postgresql+psycopg://db/alerts?sslmode=verify-full", "postgresql+psycopg://db/alerts?sslmode=verify-full"),
    ("postgresql+psycopg2://db/alerts?sslmode=verify-full", "postgresql://db/alerts?sslmode=verify-full"),
    ("sqlite:///alerts.db", "sqlite:///alerts.db"),
])
def test_database_urls_are_read_with_postgres_as_postgresql_and_the_query_kept(given, read_as):
    assert Settings.from_env({"DATABASE_URL": given}).database_url == read_as


@pytest.mark.parametrize("given", ["mysql://u@h/db", "mssql+pyodbc://h/db", "alerts.db", "oracle://h"])
def test_other_kinds_are_refused_naming_database_url(given):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL": given})
    assert caught.value.variable == "DATABASE_URL"
