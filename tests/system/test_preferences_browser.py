"""The preferences page in a real browser: headless Chromium (Debian's, driven by
Playwright) opens the "Manage alerts" link of an email that went out through the real
SMTP channel, served by `alerts web` on localhost, with scripts off. A subscriber moves a
subscription from digest to instant and sets quiet hours; the database shows it, and the
pipeline then delivers accordingly: an instant email at once, and one held until the
quiet hours end. The same at 375 px. axe-core (axe-playwright-python) checks each page
for accessibility; a post from another site and a forged form are refused.

Screenshots, the email, and axe's findings are kept under test-artifacts/preferences/
(the test prints the paths). Skipped only when no chromium binary is installed
(.ci/run installs Debian's).
"""
from __future__ import annotations

import email
import json
import re
import shutil
import sys
import threading
from datetime import datetime, timedelta, timezone
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.db import make_engine
from alerts.core.settings import Settings
from alerts.phases.pipeline import ALL, run_phases, session
from tests.support.clock import clock_at
from tests.support.e2e_runner import ROOT, runner_env
from tests.support.factories import WINDOW_END, add_digest, add_event, add_pref, add_user
from tests.support.fakes.fixtures import with_fakes
from tests.system.test_web_servers import Server, free_port

pytestmark = pytest.mark.slow

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts" / "preferences"
KEY = "b" * 16 + "0123456789abcdef"
UTC = timezone.utc
VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "375px": {"width": 375, "height": 812}}
# Europe/Amsterdam in January is UTC+1.
NOON = datetime(2027, 1, 12, 13, 0, tzinfo=UTC)  # 14:00 local
EVENING = datetime(2027, 1, 12, 22, 0, tzinfo=UTC)  # 23:00 local: inside 22:00-07:00
QUIET_END = datetime(2027, 1, 13, 6, 0, tzinfo=UTC)  # 07:00 local
WAIT_MS = 15_000

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium; "
                                                              ".ci/run does)")


@pytest.fixture
def sync_api():
    return pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")


@pytest.fixture
def site(pg_url, tmp_path, smtp_server):
    """`alerts web` on a free port, the settings the pipeline runs with (email to the fake
    SMTP server, links to that web server), and Jane: a daily email digest of price spikes."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = with_fakes(Settings.from_env({"DATABASE_URL": pg_url, "ALERTS_PUBLIC_URL": base,
                                             "ALERTS_SECRET_KEY": KEY}), smtp_server)
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        jane = add_user(conn, email="jane.doe@example.com", timezone="Europe/Amsterdam")
        add_pref(conn, jane, alert_type="price_spike", delivery_kind="digest")
        add_digest(conn, jane)  # yesterday's digest, due now: the email that carries the link
    server = Server([sys.executable, "-m", "alerts", "web", "--port", str(port)],
                    runner_env(pg_url, ALERTS_SECRET_KEY=KEY, ALERTS_PUBLIC_URL=base), tmp_path / "alerts-web.log")
    try:
        server.wait_until_up(base)
        yield {"base": base, "settings": settings, "engine": engine, "jane": jane, "smtp": smtp_server}
    finally:
        log = server.stop()
        engine.dispose()
        assert "/preferences/***" in log and not re.search(r"/preferences/[A-Za-z0-9_-]{8,}", log), \
            "no token in the server's log"


def launch(sync_api, playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def run_pipeline(site, now: datetime) -> dict:
    settings = site["settings"]
    with session(site["engine"], settings) as (db, channels):
        return run_phases(db, ALL, clock_at(now), settings, channels)


def the_email_with_the_link(site, tmp_path) -> tuple[Path, str]:
    """Send the digest through the real SMTP channel; the HTML part as a file, and its link."""
    assert run_pipeline(site, WINDOW_END + timedelta(minutes=1))["c"]["digests"]["sent"] == 1
    (mail,) = site["smtp"].messages
    message = email.message_from_bytes(mail.data, policy=policy.default)
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    url = re.search(r"^Manage alerts: (\S+)\r?$", text, re.M).group(1)
    assert url.startswith(site["base"] + "/preferences/") and f'href="{url}"' in html
    path = tmp_path / "digest-email.html"
    path.write_text(html)
    return path, url


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def accessibility(context, url: str, name: str, *, submit_invalid: bool = False) -> list[dict]:
    """axe-core's serious and critical violations on the page at ``url`` (scripts on for
    axe only; the page has none of its own). Its full findings are kept as an artifact."""
    from axe_playwright_python.sync_playwright import Axe

    page = context.new_page()
    page.goto(url)
    if submit_invalid:
        page.fill("#quiet-start", "22:00")
        page.fill("#quiet-end", "")  # half a quiet period: refused, the error next to the field
        page.get_by_role("button", name="Save changes").click()
        page.get_by_role("alert").wait_for(timeout=WAIT_MS)
        shot(page, f"{name}.png")
    results = Axe().run(page, options={"resultTypes": ["violations"]}).response
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"axe-{name}.json").write_text(json.dumps(results["violations"], indent=2))
    print(f"axe {results['testEngine']['version']} on {name}: "
          f"{len(results['violations'])} violation(s): {[(v['id'], v['impact']) for v in results['violations']]}")
    width = page.evaluate("document.documentElement.scrollWidth")
    viewport = page.viewport_size["width"]
    assert width <= viewport, f"{name}: the page is {width}px wide in a {viewport}px window"
    page.close()
    return [v for v in results["violations"] if v["impact"] in ("serious", "critical")]


def user_state(engine, jane) -> tuple:
    p = m.user_alert_prefs
    with engine.connect() as conn:
        quiet = conn.execute(sa.select(m.users.c.quiet_hours).where(m.users.c.id == jane)).scalar_one()
        kinds = conn.execute(sa.select(p.c.delivery_kind).where(p.c.user_id == jane)).scalars().all()
    return quiet, kinds


@needs_chromium
@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_a_subscriber_moves_to_instant_with_quiet_hours_and_the_pipeline_follows(site, sync_api, tmp_path, viewport):
    engine, jane = site["engine"], site["jane"]
    email_file, url = the_email_with_the_link(site, tmp_path)
    requested: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = launch(sync_api, playwright)
        try:
            context = browser.new_context(java_script_enabled=False, viewport=VIEWPORTS[viewport])
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(email_file.as_uri())
            page.get_by_role("link", name="Manage alerts").click()
            page.get_by_role("heading", name="Your EnergyRiskIQ alerts").wait_for(timeout=WAIT_MS)
            assert page.url == url
            assert "j***@example.com" in page.inner_text("main") and "jane.doe" not in page.content()
            shot(page, f"preferences-{viewport}.png")

            subscription = page.locator("select[id^='sub-'][id$='-kind']").get_attribute("id")  # her one
            page.select_option(f"#{subscription}", "instant")
            page.fill("#quiet-start", "22:00")
            page.fill("#quiet-end", "07:00")
            page.get_by_role("button", name="Save changes").click()
            page.get_by_role("status").filter(has_text="Your changes are saved").wait_for(timeout=WAIT_MS)
            shot(page, f"preferences-saved-{viewport}.png")
            assert user_state(engine, jane) == ("22:00-07:00", ["instant"])

            checked = browser.new_context(viewport=VIEWPORTS[viewport], bypass_csp=True)
            serious = accessibility(checked, url, f"preferences-{viewport}")
            serious += accessibility(checked, url, f"preferences-errors-{viewport}", submit_invalid=True)
            checked.close()
        finally:
            browser.close()
    assert serious == [], json.dumps(serious, indent=2)
    assert all(r.startswith((site["base"] + "/", "file://")) for r in requested), "no third-party assets"

    site["smtp"].reset()
    with engine.begin() as conn:
        at_noon = add_event(conn, alert_type="price_spike", severity=3, title="Spot price spike", created_at=NOON)
    assert run_pipeline(site, NOON)["c"]["instant"]["sent"] == 1
    (mail,) = site["smtp"].messages
    assert mail.rcpt_tos == ["jane.doe@example.com"] and f"#{at_noon}" in mail.message.get_body(("plain",)).get_content()

    site["smtp"].reset()
    with engine.begin() as conn:
        at_night = add_event(conn, alert_type="price_spike", severity=3, title="Night spike", created_at=EVENING)
    assert run_pipeline(site, EVENING)["c"]["instant"]["sent"] == 0
    d = m.user_alert_deliveries
    with engine.connect() as conn:
        held = conn.execute(sa.select(d.c.status, d.c.next_retry_at).where(d.c.alert_event_id == at_night)).one()
    assert tuple(held) == ("queued", QUIET_END) and site["smtp"].messages == []
    assert run_pipeline(site, QUIET_END - timedelta(minutes=1))["c"]["instant"]["sent"] == 0
    assert run_pipeline(site, QUIET_END)["c"]["instant"]["sent"] == 1
    (mail,) = site["smtp"].messages
    assert f"#{at_night}" in mail.message.get_body(("plain",)).get_content()


class _Attacker(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args):
        pass


@needs_chromium
def test_a_post_from_another_site_and_a_forged_form_are_refused_and_change_nothing(site, sync_api, tmp_path):
    engine, jane = site["engine"], site["jane"]
    _, url = the_email_with_the_link(site, tmp_path)
    before = user_state(engine, jane)
    with sync_api.sync_playwright() as playwright:
        browser = launch(sync_api, playwright)
        try:
            # Another site's page that posts to the preferences link, even with a genuine
            # anti-forgery field copied from the page: the browser says it is cross-site.
            context = browser.new_context(java_script_enabled=False)
            page = context.new_page()
            page.goto(url)
            anti_forgery = page.locator("input[name=form_token]").get_attribute("value")
            _Attacker.page = (f'<!DOCTYPE html><html lang="en"><title>Win a prize</title><form method="post" '
                              f'action="{url}"><input type="hidden" name="form_token" value="{anti_forgery}">'
                              f'<input type="hidden" name="quiet-start" value="00:00"><input type="hidden" '
                              f'name="quiet-end" value="23:59"><button>Claim</button></form></html>').encode()
            attacker = ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
            threading.Thread(target=attacker.serve_forever, daemon=True).start()
            try:
                page.goto(f"http://localhost:{attacker.server_address[1]}/")
                with page.expect_response(url) as answer:
                    page.get_by_role("button", name="Claim").click()
                assert answer.value.status == 403
                page.get_by_role("heading", name="Nothing was changed").wait_for(timeout=WAIT_MS)
                shot(page, "refused-cross-site.png")
            finally:
                attacker.shutdown()
            assert user_state(engine, jane) == before

            # Our own page, its anti-forgery field altered (scripts on for the test only).
            forged = browser.new_context(bypass_csp=True).new_page()
            forged.goto(url)
            forged.locator("input[name=form_token]").evaluate("input => { input.value = 'forged' }")
            forged.fill("#quiet-start", "01:00")
            forged.fill("#quiet-end", "02:00")
            with forged.expect_response(url) as answer:
                forged.get_by_role("button", name="Save changes").click()
            assert answer.value.status == 403
            assert user_state(engine, jane) == before
        finally:
            browser.close()
