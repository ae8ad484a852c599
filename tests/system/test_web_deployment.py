"""The shipped web deployment keeps secrets and outlasts its longest request: the exact
gunicorn command of deploy/systemd/alerts-web.service (read from its ExecStart), run
against PostgreSQL, writes no token to its access or error log, and a one-click
unsubscribe that waits for a send in flight gets the app's answer, not a killed worker."""
from __future__ import annotations

import importlib.util
import logging
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from alerts.core import tokens
from alerts.core.db import make_engine
from alerts.subscribers.unsubscribe import IN_FLIGHT_WAIT_SECONDS
from tests.support.e2e_runner import runner_env
from tests.support.factories import add_delivery, add_event, add_pref, add_user
from tests.support.private_postgres import free_port
from tests.system.test_supervision import INSTALL_DIR, read_unit

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gunicorn") is None,
                                reason="gunicorn is in the test extra: pip install -e '.[test]'")

KEY = "deployment-test-key-0123456789abcdef"
START_SECONDS = 30
UNIT_PROGRAM = f"{INSTALL_DIR}/venv/bin/gunicorn"


def unit_command(port: int) -> list[str]:
    """The unit's ExecStart as it is, but for this Python's gunicorn and a free port."""
    args = shlex.split(read_unit("alerts-web.service")["Service"]["ExecStart"])
    assert args[0] == UNIT_PROGRAM
    bind = args.index("--bind")
    assert args[bind + 1] == "127.0.0.1:8000"
    args[bind + 1] = f"127.0.0.1:{port}"
    return [sys.executable, "-m", "gunicorn", *args[1:]]


class UnitServer:
    """The unit's gunicorn command; its stdout (the access log) and stderr (the error
    log) in files of their own."""

    def __init__(self, env: dict, directory: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.access_log, self.error_log = directory / "access.log", directory / "error.log"
        with self.access_log.open("wb") as out, self.error_log.open("wb") as err:
            self.process = subprocess.Popen(unit_command(self.port), env=env, cwd=directory, stdout=out, stderr=err)

    def wait_until_answering(self) -> None:
        """Up once /healthz answers at all (200, or 503 while the database is down)."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                requests.get(f"{self.base}/healthz", timeout=10)
                return
            except requests.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gunicorn did not come up:\n{self.logs()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        print(self.logs())  # shown when the test fails

    def logs(self) -> str:
        return f"--- access log ---\n{self.access_log.read_text()}\n--- error log ---\n{self.error_log.read_text()}"


@pytest.fixture
def unit_server(request, tmp_path):
    """Starts the unit's command for a database URL; stopped at the end of the test."""
    servers = []

    def start(database_url: str) -> UnitServer:
        server = UnitServer(runner_env(database_url, ALERTS_SECRET_KEY=KEY), tmp_path)
        servers.append(server)
        server.wait_until_answering()
        return server

    yield start
    for server in servers:
        server.stop()


def subscriber(url: str, *, sending: bool = False) -> int:
    """A reader with an email preference; with ``sending``, a send of theirs in flight
    (claimed by a sender that never finishes)."""
    engine = make_engine(url)
    with engine.begin() as conn:
        user = add_user(conn, email="jane.doe@example.com")
        add_pref(conn, user, channel="email")
        if sending:
            add_delivery(conn, user, add_event(conn, status="fanned_out"), status="sending", attempts=1,
                         claimed_at=datetime.now(timezone.utc))
    engine.dispose()
    return user


ONE_CLICK = {"data": "List-Unsubscribe=One-Click", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


def test_the_units_gunicorn_command_writes_no_token_to_its_access_or_error_log(pg_url, unit_server):
    token = tokens.make_token(KEY, subscriber(pg_url), "email")
    server = unit_server(pg_url)
    answers = [
        requests.get(f"{server.base}/unsubscribe/{token}", timeout=30).status_code,
        requests.post(f"{server.base}/unsubscribe/{token}", timeout=60, **ONE_CLICK).status_code,
        requests.get(f"{server.base}/unsubscribe/{token}?utm_source=mail", timeout=30).status_code,
        requests.get(f"{server.base}/unsubscribe/{token}x", timeout=30).status_code,
        requests.get(f"{server.base}/preferences/{token}", timeout=30).status_code,
        # The same page, its path spelled with percent-escapes: the raw request line differs.
        requests.get(f"{server.base}/%75nsubscribe/{token}", timeout=30).status_code,
    ]
    server.stop()

    assert answers[:4] == [200, 200, 200, 400]
    assert answers[5] == 200
    access, errors = server.access_log.read_text(), server.error_log.read_text()
    signature = token.rsplit(".", 1)[-1]
    for log in (access, errors):
        assert token not in log and signature not in log
    assert access.count("/unsubscribe/***") == 5 and "/preferences/***" in access, access
    assert "jane.doe" not in access + errors


def test_gunicorns_own_error_lines_have_the_token_cut_out(tmp_path):
    """What gunicorn logs when a request breaks ("Error handling request <uri>") goes
    through the unit's logger like everything else."""
    from gunicorn.config import Config

    from alerts.web.gunicorn_conf import logger_class

    cfg = Config()
    cfg.set("errorlog", str(tmp_path / "error.log"))
    logger = logger_class(cfg)
    try:
        raise RuntimeError("client went away")
    except RuntimeError:
        logger.exception("Error handling request %s %s", "POST", "/unsubscribe/SeCrEtToKeN.sig?x=1")
    logger.error("Error handling request %s", "/preferences/SeCrEtToKeN.sig")
    logger.error("Error handling request %s", "/%75nsubscribe/SeCrEtToKeN.sig")
    for handler in logger.error_log.handlers:
        handler.flush()

    text = (tmp_path / "error.log").read_text()
    assert "SeCrEtToKeN" not in text
    assert "POST /unsubscribe/***?x=1" in text and "/preferences/***" in text


def test_the_units_worker_timeout_and_graceful_stop_outlast_the_longest_request():
    """gunicorn's own reading of the unit's command line (with its config module)."""
    from gunicorn.app.wsgiapp import WSGIApplication

    from alerts.web.gunicorn_conf import LONGEST_REQUEST_SECONDS, RedactingLogger

    argv, sys.argv = sys.argv, ["gunicorn", *unit_command(8000)[3:]]
    try:
        cfg = WSGIApplication().cfg
    finally:
        sys.argv = argv
    assert LONGEST_REQUEST_SECONDS > IN_FLIGHT_WAIT_SECONDS
    assert cfg.timeout > LONGEST_REQUEST_SECONDS
    assert cfg.graceful_timeout > LONGEST_REQUEST_SECONDS
    assert int(read_unit("alerts-web.service")["Service"]["TimeoutStopSec"]) > cfg.graceful_timeout
    assert cfg.logger_class is RedactingLogger


@pytest.mark.slow
def test_an_unsubscribe_waiting_for_a_send_in_flight_gets_the_apps_answer(pg_url, unit_server):
    """The longest request: a send of the reader's stays in flight, so the POST waits the
    whole IN_FLIGHT_WAIT_SECONDS and answers 503 with Retry-After — under gunicorn's
    default 30 s worker timeout the worker was killed first and the client got nothing."""
    token = tokens.make_token(KEY, subscriber(pg_url, sending=True), "email")
    server = unit_server(pg_url)

    started = time.monotonic()
    response = requests.post(f"{server.base}/unsubscribe/{token}", timeout=IN_FLIGHT_WAIT_SECONDS + 60, **ONE_CLICK)
    waited = time.monotonic() - started
    server.stop()

    assert (response.status_code, response.headers.get("Retry-After")) == (503, "60")
    assert "Your unsubscribe is recorded" in response.text
    assert waited >= IN_FLIGHT_WAIT_SECONDS
    assert "WORKER TIMEOUT" not in server.error_log.read_text()


def test_the_apps_own_line_for_a_page_it_cannot_serve_keeps_the_token_out(caplog):
    """The database is down: the app logs the page it answered 503 on, without its token."""
    from flask import Flask

    from alerts.web import create_app
    from alerts.core.settings import Settings

    app: Flask = create_app(Settings(database_url="postgresql://nobody@127.0.0.1:1/none", secret_key=KEY))
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get(f"/unsubscribe/{tokens.make_token(KEY, 1, 'email')}")
    assert response.status_code == 503
    assert caplog.records and all("/unsubscribe/***" in r.getMessage() for r in caplog.records)
    assert not any(tokens.make_token(KEY, 1, "email") in r.getMessage() for r in caplog.records)
