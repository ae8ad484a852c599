"""The web app served by real servers (docs/web-and-security.md): gunicorn answering the one-click POST
a mail provider sends, and the unsubscribe page in a real browser (headless Chromium
driven by Playwright) served by ``alerts web``."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core import tokens
from alerts.subscribers import unsubscribe as unsub
from alerts.core.db import make_engine
from alerts.web import MAX_BODY_BYTES
from tests.support.e2e_runner import ROOT, runner_env
from tests.support.factories import add_delivery, add_event, add_pref, add_user
from tests.integration.web.test_app import KEY

START_SECONDS = 30
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A server process on a free port, up once /healthz answers; stopped on exit."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self.process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_until_up(self, base: str) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not come up:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> str:
        """Stop it; its log, also printed (pytest shows it when the test fails)."""
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        text = self.log.read_text()
        print(f"--- {self.log.name} ---\n{text}")
        return text


def seed(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    with engine.begin() as conn:
        user = add_user(conn, email="jane.doe@example.com")
        add_pref(conn, user, channel="email")
        delivery = add_delivery(conn, user, add_event(conn, status="fanned_out"))
    engine.dispose()
    return user, delivery


def subscription(url: str, user: int, delivery: int) -> tuple[list[bool], tuple]:
    engine = make_engine(url)
    p, d = m.user_alert_prefs, m.user_alert_deliveries
    with engine.connect() as conn:
        enabled = conn.execute(sa.select(p.c.enabled).where(p.c.user_id == user)).scalars().all()
        row = tuple(conn.execute(sa.select(d.c.status, d.c.last_error).where(d.c.id == delivery)).one())
    engine.dispose()
    return enabled, row


@pytest.mark.slow
def test_gunicorn_serves_the_app_and_answers_the_one_click_post(pg_url, tmp_path):
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e '.[test]'")
    user, delivery = seed(pg_url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = tokens.make_token(KEY, user, "email")
    server = Server([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                     "--access-logfile", "-", "--access-logformat", '%(m)s %(s)s', "alerts.web:app"],
                    runner_env(pg_url, ALERTS_SECRET_KEY=KEY), tmp_path / "gunicorn.log")
    try:
        server.wait_until_up(base)
        # Exactly what a mail provider sends (RFC 8058 §3.1).
        response = requests.post(f"{base}/unsubscribe/{token}", data="List-Unsubscribe=One-Click",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30,
                                 allow_redirects=False)
        assert response.status_code == 200
        assert subscription(pg_url, user, delivery) == ([False], ("skipped", "unsubscribed"))
        assert requests.post(f"{base}/unsubscribe/{token}x", data={"List-Unsubscribe": "One-Click"},
                             timeout=30).status_code == 400
        # Just over the cap: small enough to be sent whole before the server answers and
        # closes (a much larger body can meet a connection reset instead of the 413).
        assert requests.post(f"{base}/unsubscribe/{token}", data="x" * (MAX_BODY_BYTES + 100), timeout=30,
                             headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 413
    finally:
        log = server.stop()
    assert "POST 200" in log and token not in log and "jane.doe" not in log


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium; .ci/run does)")
def test_a_person_unsubscribes_and_resubscribes_in_a_real_browser(pg_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    user, delivery = seed(pg_url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = tokens.make_token(KEY, user, "email")
    server = Server([sys.executable, "-m", "alerts", "web", "--port", str(port)],
                    runner_env(pg_url, ALERTS_SECRET_KEY=KEY), tmp_path / "alerts-web.log")
    requested: list[str] = []
    try:
        server.wait_until_up(base)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_context(java_script_enabled=False).new_page()
                page.on("request", lambda request: requested.append(request.url))
                page.goto(f"{base}/unsubscribe/{token}")
                assert "j***@example.com" in page.inner_text("main")
                assert subscription(pg_url, user, delivery) == ([True], ("queued", None)), "a GET changes nothing"
                page.get_by_role("button", name="Unsubscribe").click()
                page.get_by_role("heading", name="You are unsubscribed").wait_for(timeout=15_000)
                shot = tmp_path / "unsubscribed.png"
                page.screenshot(path=str(shot), full_page=True)
                ARTIFACTS.mkdir(exist_ok=True)
                shutil.copy(shot, ARTIFACTS / "unsubscribe-confirmed.png")
                assert subscription(pg_url, user, delivery) == ([False], ("skipped", "unsubscribed"))
                assert "jane.doe@example.com" not in page.content()

                page.get_by_role("button", name="Resubscribe").click()
                page.get_by_role("heading", name="You are subscribed again").wait_for(timeout=15_000)
                page.screenshot(path=str(ARTIFACTS / "resubscribed.png"), full_page=True)
                assert subscription(pg_url, user, delivery) == ([True], ("skipped", "unsubscribed"))
            finally:
                browser.close()
    finally:
        log = server.stop()
    assert shot.stat().st_size > 1000
    assert requested and all(url.startswith(base + "/") for url in requested), "no third-party assets"
    assert token not in log and "/unsubscribe/***" in log
