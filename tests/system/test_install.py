"""Installed, not only checked out: a wheel built from this tree, installed into a fresh
virtual environment, runs every entry point from another directory — ``alerts --version``,
``alerts migrate`` on an empty PostgreSQL database, the runner, a Celery worker that
sends a digest, and the steps of the GitHub Actions workflow as the file writes them.

To stay fast and offline the environment sees the machine's site-packages for the
dependencies (``--system-site-packages``) and the wheel is installed with ``--no-deps``;
every process runs outside the checkout, without PYTHONPATH, and a test checks that the
package, its migrations and the Celery modules are imported from the environment's own
site-packages — so whatever the wheel lacks fails here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from celery import Celery
from ruamel.yaml import YAML

import alerts
from alerts.core.db import head_revision, make_engine
from tests.conftest import PG_ADMIN_URL
from tests.integration.channels.test_email import certificate, server_context  # noqa: F401 (a fixture)
from tests.support.e2e_runner import dump_database, runner_env
from tests.support.fakes.smtp_server import FakeSmtpServer
from tests.support.private_postgres import free_port
from tests.support.factories import add_digest, add_event, add_pref, add_user
from tests.system.test_celery_worker import wait_until
from tests.system.test_web_deployment import KEY as WEB_KEY, unit_command
from tests.integration.celery.test_tasks import AFTER_WINDOW, iso

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "deploy" / "github-actions" / "alerts-cron.yml"
BUILD_SECONDS = 300
RUN_SECONDS = 120
WORKER_BROKER_DB = 15

pytestmark = pytest.mark.slow


class Install:
    """The source tree copied (as git sees it, uncommitted files included), its wheel, and
    a virtual environment with that wheel installed; ``home`` is a directory outside all
    of them to run commands from."""

    def __init__(self, base: Path):
        self.source, self.venv, self.home = base / "source", base / "venv", base / "home"
        self.home.mkdir()
        copy_tree(ROOT, self.source)
        self.wheel = build_wheel(self.source, base / "dist")
        run([sys.executable, "-m", "venv", "--system-site-packages", str(self.venv)], timeout=BUILD_SECONDS)
        run([str(self.python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(self.wheel)],
            timeout=BUILD_SECONDS)
        self.site_packages = Path(run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                      cwd=self.home).stdout.strip())

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, database_url: str = "sqlite:///unused.db", smtp=None, **extra: str) -> dict:
        """A process environment with none of the checkout in it: no PYTHONPATH, the
        environment's bin/ first on PATH."""
        env = runner_env(database_url, smtp, **extra)
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        return env


def copy_tree(root: Path, target: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (root / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target / name)


def build_wheel(source: Path, dist: Path) -> Path:
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(source)],
        timeout=BUILD_SECONDS)
    (wheel,) = dist.glob("energyriskiq_alerts-*.whl")
    return wheel


def run(args: list[str], *, timeout: float = RUN_SECONDS, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Install:
    return Install(tmp_path_factory.mktemp("install"))


@pytest.fixture
def empty_database():
    """A PostgreSQL database with nothing in it (no schema), dropped after the test."""
    name = f"alerts_install_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                             "AND pid <> pg_backend_pid()", (name,))
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


def alerts_command(installed: Install, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(installed.bin / "alerts"), *args], env=env, cwd=installed.home, check=check)


def migrate(installed: Install, url: str) -> None:
    result = alerts_command(installed, "migrate", env=installed.env(url))
    assert result.stdout.strip() == f"database at revision {head_revision()}"


def seed(url: str, **event_cols) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        add_pref(conn, add_user(conn, email="reader@example.com"))
        add_event(conn, created_at=datetime.now(timezone.utc) - timedelta(minutes=1), **event_cols)
    engine.dispose()


# --- the wheel -----------------------------------------------------------------------------------

def test_the_wheel_carries_every_file_of_the_package_and_the_celery_modules(installed):
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "alerts"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    expected = {name for name in listed if (ROOT / name).is_file() and "__pycache__" not in name}
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    assert sorted(expected - names) == []
    assert {"celery_app.py", "beat_schedule.py"} <= names
    assert any(name.startswith("alerts/core/migrations/versions/") for name in names)


def test_every_module_comes_from_the_environment_not_the_checkout(installed):
    probe = ("import json, alerts, celery_app, beat_schedule, alerts.core.db as db, alerts.web.gunicorn_conf as g\n"
             "print(json.dumps([alerts.__file__, celery_app.__file__, beat_schedule.__file__, str(db.MIGRATIONS_DIR),"
             " g.__file__]))")
    paths = json.loads(run([str(installed.python), "-c", probe], env=installed.env(), cwd=installed.home).stdout)
    for path in paths:
        assert Path(path).is_relative_to(installed.site_packages), path
    assert Path(paths[3], "versions").is_dir()


def test_alerts_version_prints_the_version(installed):
    result = alerts_command(installed, "--version", env=installed.env())
    assert result.stdout.strip() == f"alerts, version {alerts.__version__}"


# --- the commands, the runner and a worker, from another directory -------------------------------

def test_alerts_migrate_on_an_empty_database_then_the_runner_delivers(installed, empty_database, smtp_server):
    migrate(installed, empty_database)
    migrate(installed, empty_database)  # safe to repeat
    seed(empty_database)

    result = run([str(installed.python), "-m", "alerts.runner", "--phase", "all", "--json"],
                 env=installed.env(empty_database, smtp_server), cwd=installed.home)

    assert json.loads(result.stdout)["c"]["instant"]["sent"] == 1
    assert [mail.rcpt_tos for mail in smtp_server.messages] == [["reader@example.com"]]
    for command in (["status"], ["check"]):
        assert alerts_command(installed, *command, env=installed.env(empty_database)).returncode == 0


def test_a_celery_worker_of_the_install_sends_a_digest(installed, empty_database, redis_server, smtp_server):
    migrate(installed, empty_database)
    engine = make_engine(empty_database)
    with engine.begin() as conn:
        digest = add_digest(conn, add_user(conn, email="digest.reader@example.com"), events=2)
    engine.dispose()
    broker = redis_server.url(WORKER_BROKER_DB)
    env = installed.env(empty_database, smtp_server, CELERY_BROKER_URL=broker)
    log = installed.home / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([str(installed.python), "-m", "celery", "-A", "celery_app", "worker", "-Q",
                                   "install-test", "--pool", "threads", "-c", "1", "--without-gossip",
                                   "--without-mingle", "--without-heartbeat", "-n", f"install-{os.getpid()}@localhost",
                                   "--loglevel=INFO"], env=env, cwd=installed.home, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    client = Celery("test-client", broker=broker)
    client.conf.update(task_serializer="json", accept_content=["json"])
    try:
        wait_until(lambda: " ready." in log.read_text() or worker.poll() is not None, 60, log.read_text)
        client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(AFTER_WINDOW)},
                         queue="install-test")
        wait_until(lambda: len(smtp_server.messages) == 1, 60, log.read_text)
    finally:
        client.close()
        worker.terminate()
        worker.wait(30)
    assert smtp_server.messages[0].rcpt_tos == ["digest.reader@example.com"]
    assert smtp_server.messages[0].message["X-Alerts-Digest-Key"]


def test_the_web_units_gunicorn_command_serves_from_the_install(installed, empty_database):
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra")
    migrate(installed, empty_database)
    port = free_port()
    command = [str(installed.python), *unit_command(port)[1:]]
    log = installed.home / "gunicorn.log"
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=installed.env(empty_database, ALERTS_SECRET_KEY=WEB_KEY),
                                  cwd=installed.home, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: healthz(port) == 200 or server.poll() is not None, 60, log.read_text)
        assert healthz(port) == 200
    finally:
        server.terminate()
        server.wait(30)


def healthz(port: int) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code
    except requests.ConnectionError:
        return None


# --- the GitHub Actions workflow, step by step ---------------------------------------------------

EXPRESSION = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")


def github_value(expression: str, secrets: dict, dry_run: bool | None) -> str:
    """What GitHub puts in for the few expressions the workflow uses: a secret (unset ⇒
    empty), a variable of the environment (none set here), the dry_run input (absent on a
    scheduled run)."""
    kind, _, name = expression.partition(".")
    if kind == "secrets":
        return secrets.get(name, "")
    if kind == "vars":
        return ""
    if expression == "inputs.dry_run":
        return "" if dry_run is None else str(dry_run).lower()
    raise AssertionError(f"the test does not know the expression ${{{{ {expression} }}}}: teach github_value")


def github_condition(condition: str, dry_run: bool | None) -> bool:
    found = EXPRESSION.fullmatch(condition.strip())
    expression = found.group(1) if found else condition.strip()
    if expression == "!inputs.dry_run":
        return not dry_run
    raise AssertionError(f"the test does not know the condition {condition!r}: teach github_condition")


def substitute(value: str, secrets: dict, dry_run: bool | None) -> str:
    return EXPRESSION.sub(lambda m: github_value(m.group(1), secrets, dry_run), str(value))


def run_workflow(installed: Install, secrets: dict, dry_run: bool | None,
                 **machine: str) -> list[subprocess.CompletedProcess]:
    """Every ``run:`` step of the job in order, as GitHub runs it: bash -eo pipefail in the
    checkout, the job's and the step's env with their expressions filled in; ``uses:``
    steps are GitHub's (checkout, setup-python): the source copy and the environment's
    Python on PATH stand in for them. ``machine``: the runner machine's own variables."""
    (job,) = YAML(typ="safe").load(WORKFLOW.read_text())["jobs"].values()
    job_env = {name: substitute(value, secrets, dry_run) for name, value in job.get("env", {}).items()}
    results = []
    for step in job["steps"]:
        if "run" not in step or ("if" in step and not github_condition(step["if"], dry_run)):
            continue
        env = {**installed.env(**machine), **job_env,
               **{name: substitute(value, secrets, dry_run) for name, value in step.get("env", {}).items()}}
        result = run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], env=env,
                     cwd=installed.source, timeout=BUILD_SECONDS)
        results.append(result)
    return results


@pytest.fixture
def mail_provider(certificate):
    """An SMTP server like a provider's: STARTTLS with a certificate the machine trusts
    (SSL_CERT_FILE) and a password."""
    with FakeSmtpServer(users={"alerts@example.com": "smtp-s3cret"}, starttls_context=server_context(certificate)) as server:
        yield server


def test_the_github_workflow_steps_as_written_migrate_and_deliver(installed, empty_database, mail_provider,
                                                                  certificate):
    secrets = {"DATABASE_URL": empty_database, "ALERTS_SMTP_HOST": mail_provider.host,
                            "ALERTS_SMTP_PORT": str(mail_provider.port), "ALERTS_SMTP_USER": "alerts@example.com",
                            "ALERTS_SMTP_PASSWORD": "smtp-s3cret", "ALERTS_EMAIL_FROM": "Alerts <alerts@example.com>"}
    migrate(installed, empty_database)  # so there is something to send; the workflow migrates again
    seed(empty_database)

    results = run_workflow(installed, secrets, dry_run=None, SSL_CERT_FILE=certificate[0])

    assert len(results) == 3, "install, migrate, run"
    assert results[1].stdout.strip() == f"database at revision {head_revision()}"
    assert json.loads(results[2].stdout)["c"]["instant"]["sent"] == 1
    assert [(mail.rcpt_tos, mail.tls) for mail in mail_provider.messages] == [(["reader@example.com"], True)]
    assert all("smtp-s3cret" not in result.stdout + result.stderr for result in results)


def test_the_workflows_steps_on_an_empty_database_create_the_schema(installed, empty_database):
    results = run_workflow(installed, {"DATABASE_URL": empty_database}, dry_run=None)

    assert json.loads(results[-1].stdout)["a"] == {"accepted": 0, "rejected": 0}
    engine = make_engine(empty_database)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == head_revision()
    engine.dispose()


def test_the_workflows_dry_run_skips_the_migration_and_changes_nothing(installed, empty_database):
    migrate(installed, empty_database)
    seed(empty_database)
    before = dump_database(empty_database)

    results = run_workflow(installed, {"DATABASE_URL": empty_database}, dry_run=True)

    assert len(results) == 2, "install and the dry run: no migration"
    assert dump_database(empty_database) == before
