"""Long-running services ride out a database outage: the web app (``alerts web``, and the
unit's gunicorn command) starts while PostgreSQL is down, answers 503 on /healthz and on
its pages, and 200 once the database is back — no restart; a Celery worker started while
it is down keeps retrying and sends once it is back.

The database here is a PostgreSQL server of the test's own (tests/support/private_postgres.py)
that the test stops and starts; the machine's shared server is never touched.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests
from celery import Celery

from alerts.core import tables as m
from alerts.core import tokens
from alerts.core.db import make_engine, migrate
from tests.support.e2e_runner import runner_env
from tests.support.factories import add_digest, add_pref, add_user
from tests.support.private_postgres import PrivatePostgres, free_port, server_bin_dir
from tests.system.test_celery_worker import celery_env, start_worker, status_of, wait_until
from tests.integration.celery.test_tasks import AFTER_WINDOW, iso
from tests.system.test_web_deployment import KEY, UnitServer

BIN_DIR = server_bin_dir()
pytestmark = pytest.mark.skipif(BIN_DIR is None, reason="no PostgreSQL server programs (initdb, pg_ctl) installed")
RECOVERY_SECONDS = 30
START_SECONDS = 30


@pytest.fixture
def postgres():
    """A private PostgreSQL with a migrated database ``alerts`` — left stopped."""
    server = PrivatePostgres(BIN_DIR)
    try:
        server.start()
        server.url_alerts = server.create_database("alerts")
        migrate(server.url_alerts)
        server.stop()
        yield server
    finally:
        server.remove()


def add_subscriber(server: PrivatePostgres) -> int:
    engine = make_engine(server.url_alerts)
    with engine.begin() as conn:
        user = add_user(conn, email="jane.doe@example.com")
        add_pref(conn, user, channel="email")
    engine.dispose()
    return user


class DevServer:
    """``alerts web`` (Werkzeug's development server)."""

    def __init__(self, env: dict, directory):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = directory / "alerts-web.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "alerts", "web", "--port", str(self.port)],
                                            env=env, cwd=directory, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"alerts web did not come up:\n{self.log.read_text()}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            requests.get(f"{self.base}/healthz", timeout=10)
            return True
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)
        print(self.log.read_text())


@pytest.fixture(params=["alerts web", "the unit's gunicorn"])
def web_server(request, postgres, tmp_path):
    """The web app on the (stopped) database: started, it must come up all the same."""
    env = runner_env(postgres.url_alerts, ALERTS_SECRET_KEY=KEY)
    if request.param == "alerts web":
        server = DevServer(env, tmp_path)
    else:
        pytest.importorskip("gunicorn", reason="gunicorn is in the test extra")
        server = UnitServer(env, tmp_path)
        server.wait_until_answering()
    yield server
    server.stop()


def answers(server, token: str) -> tuple[int, int]:
    return (requests.get(f"{server.base}/healthz", timeout=30).status_code,
            requests.get(f"{server.base}/unsubscribe/{token}", timeout=30).status_code)


def wait_for_answers(server, token: str, expected: tuple[int, int]) -> None:
    wait_until(lambda: answers(server, token) == expected, RECOVERY_SECONDS, lambda: f"last: {answers(server, token)}")


def test_the_web_app_starts_with_the_database_down_and_serves_once_it_is_back(postgres, web_server):
    postgres.start()
    token = tokens.make_token(KEY, add_subscriber(postgres), "email")
    postgres.stop()
    pid = web_server.process.pid

    assert answers(web_server, token) == (503, 503)
    healthz = requests.get(f"{web_server.base}/healthz", timeout=30)
    assert healthz.json() == {"database": "unreachable"}
    assert "Try again later" in requests.get(f"{web_server.base}/unsubscribe/{token}", timeout=30).text

    postgres.start()
    wait_for_answers(web_server, token, (200, 200))
    assert "j***@example.com" in requests.get(f"{web_server.base}/unsubscribe/{token}", timeout=30).text

    postgres.stop()  # a restart under the running app: its pooled connections die
    wait_for_answers(web_server, token, (503, 503))
    postgres.start()
    wait_for_answers(web_server, token, (200, 200))
    assert web_server.process.poll() is None and web_server.process.pid == pid, "never restarted"


def test_alerts_web_says_once_that_it_serves_without_the_database(postgres, tmp_path):
    server = DevServer(runner_env(postgres.url_alerts.replace("postgres@", "postgres:s3cret-pw@"),
                                  ALERTS_SECRET_KEY=KEY), tmp_path)
    server.stop()
    log = server.log.read_text()
    assert "DATABASE_URL postgresql://postgres:***@127.0.0.1" in log and "Connection refused" in log
    assert "serving anyway" in log and "s3cret-pw" not in log


def test_a_worker_started_while_the_database_is_down_keeps_retrying_and_sends_once_it_is_back(
        postgres, redis_server, smtp_server, tmp_path):
    postgres.start()
    engine = make_engine(postgres.url_alerts)
    with engine.begin() as conn:
        digest = add_digest(conn, add_user(conn))
    engine.dispose()
    postgres.stop()
    broker = redis_server.url(13)
    worker = start_worker(celery_env(broker, postgres.url_alerts, smtp_server.host, smtp_server.port), tmp_path,
                          queues="outage-test", pool="threads", concurrency=1)
    client = Celery("test-client", broker=broker)
    client.conf.update(task_serializer="json", accept_content=["json"])
    try:
        client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(AFTER_WINDOW)}, queue="outage-test")
        wait_until(lambda: " retry: Retry in " in worker.output(), 60, worker.output)
        assert worker.popen.poll() is None, "the worker keeps running"

        postgres.start()
        wait_until(lambda: len(smtp_server.messages) == 1, 90, worker.output)
    finally:
        worker.stop()
        client.close()
    engine = make_engine(postgres.url_alerts)
    with engine.connect() as conn:
        assert status_of(conn, m.user_alert_digests, digest) == ("sent", 1)
    engine.dispose()
