"""Security pass (issue 5, item 6): secrets stay secret, SQL stays parameterised, hostile
input is rejected or defused — checked with real runs against the fake SMTP server and
the fake Telegram/Twilio API, on real databases.

HTML escaping of event text in email and Telegram is covered by tests/test_messages_*.py
and not repeated here.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.core import tables as m
from alerts.channels import DeliveryError
from alerts.channels.http import MAX_DESCRIPTION_CHARS, URLLIB3_URL_LOGGERS, basic_auth_forms
from alerts.channels.sms import TwilioSmsChannel
from alerts.channels.telegram import TelegramChannel
from alerts.cli import cli
from alerts.core.settings import Settings
from alerts.core.db import Database, make_engine
from alerts.phases.ingest import MAX_EVENT_BYTES, MalformedEvent, ingest_event, ingest_lines
from alerts.messages import TextMessage
from alerts.phases.intake import MAX_SUMMARY_CHARS, MAX_TITLE_CHARS, MAX_URL_CHARS, run_phase_a
from alerts.phases.pipeline import run_phases, session
from tests.support.clock import NO_CHANNELS, clock_at
from tests.support.factories import add_event, add_pref, add_user
from tests.support.fakes import ProviderApi
from tests.support.fakes.provider_api import Scripted
from tests.support.fakes.smtp_server import FakeSmtpServer

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 5, 12, 12, 0, tzinfo=timezone.utc)
CHAT_ID = "424242"
PHONE = "+31612345678"

# Realistic-looking secrets, long enough that a partial leak is detectable.
BOT_TOKEN = "5123456789:AAHfiqZx9-realistic_BOT_token_0123456789"
TWILIO_SID = "AC" + "1f" * 16
TWILIO_TOKEN = "f3a9c1e2b7d84c0aa1b2c3d4e5f60718"
SMTP_USER = "alerts"
SMTP_PASSWORD = "correct-horse-SMTP-battery-9f2c"
SECRETS = (BOT_TOKEN, TWILIO_TOKEN, SMTP_PASSWORD, *basic_auth_forms(TWILIO_SID, TWILIO_TOKEN))
PARTIAL = 10  # any run of this many characters of a secret counts as a leak


def assert_hidden(text: str, secrets=SECRETS) -> None:
    """Neither a secret nor any PARTIAL-character piece of one (a cut-off token still
    leaks) appears in ``text``."""
    for secret in secrets:
        pieces = {secret[i:i + PARTIAL] for i in range(len(secret) - PARTIAL + 1)} or {secret}
        leaked = sorted(piece for piece in pieces if piece in text)
        assert not leaked, f"secret {secret[:4]}… leaked: {leaked[:3]}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- fixtures: fakes that know our secrets --------------------------------------------------

@pytest.fixture(scope="module")
def api_session():
    with ProviderApi(bot_token=BOT_TOKEN, twilio_sid=TWILIO_SID, twilio_token=TWILIO_TOKEN) as api:
        yield api


@pytest.fixture
def api(api_session):
    api_session.reset()
    yield api_session
    api_session.reset()


@pytest.fixture(scope="module")
def smtp_session():
    with FakeSmtpServer(users={SMTP_USER: SMTP_PASSWORD}) as server:
        yield server


@pytest.fixture
def smtp(smtp_session):
    smtp_session.reset()
    yield smtp_session
    smtp_session.reset()


@pytest.fixture
def env(pg_url, tmp_path, api, smtp) -> dict:
    """The environment of an operator whose every channel has credentials."""
    return {
        "DATABASE_URL": pg_url, "ALERTS_OUTBOX_DIR": str(tmp_path / "outbox"),
        "ALERTS_SMTP_HOST": smtp.host, "ALERTS_SMTP_PORT": str(smtp.port), "ALERTS_SMTP_TLS": "none",
        "ALERTS_SMTP_USER": SMTP_USER, "ALERTS_SMTP_PASSWORD": SMTP_PASSWORD, "ALERTS_SMTP_TIMEOUT_SECONDS": "5",
        "ALERTS_TELEGRAM_BOT_TOKEN": BOT_TOKEN, "ALERTS_TELEGRAM_API_BASE": api.telegram_api_base,
        "ALERTS_TWILIO_ACCOUNT_SID": TWILIO_SID, "ALERTS_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "ALERTS_TWILIO_FROM": "+15005550006", "ALERTS_TWILIO_API_BASE": api.twilio_api_base,
        "ALERTS_HTTP_TIMEOUT_SECONDS": "5",
    }


def subscriber(conn) -> int:
    user = add_user(conn, email="alice@example.com", telegram_chat_id=CHAT_ID, phone=PHONE)
    for channel in ("email", "telegram", "sms"):
        add_pref(conn, user, channel=channel)
    return user


def run_all(engine, settings: Settings) -> dict:
    with session(engine, settings) as (db, channels):
        return run_phases(db, ("a", "b", "d", "c"), clock_at(NOW), settings, channels)


def last_errors(engine) -> dict[str, str | None]:
    d = m.user_alert_deliveries
    with engine.connect() as conn:
        return {r.channel: r.last_error for r in conn.execute(sa.select(d.c.channel, d.c.last_error))}


def our_logs(caplog) -> str:
    """Every record our process logged, formatted with its traceback — except those of
    the fake SMTP server (aiosmtpd's "mail.log"), which plays the provider's side."""
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    return "\n".join(handler.format(r) for r in caplog.records if not r.name.startswith("mail.log"))


def status_output(env: dict) -> str:
    runner = CliRunner()
    text = runner.invoke(cli, ["status", "--now", NOW.isoformat()], env=env, catch_exceptions=False)
    as_json = runner.invoke(cli, ["status", "--json", "--now", NOW.isoformat()], env=env, catch_exceptions=False)
    assert text.exit_code == 0 and as_json.exit_code == 0, text.output + as_json.output
    return text.output + as_json.output


# --- secrets: every failure a provider can cause, through a real run --------------------------

def echoing_servers(api, smtp, env):
    """5xx answers whose text echoes the credentials; the token is placed where a
    300-character cut would split it, so masking after cutting would leak half of it."""
    pad = "x" * (MAX_DESCRIPTION_CHARS - 20)
    api.telegram_error(500, f"{pad}{BOT_TOKEN}/sendMessage failed upstream", times=None)
    basic = basic_auth_forms(TWILIO_SID, TWILIO_TOKEN)[1]
    api.twilio_error(500, 20500, f"Authorization: Basic {basic} {pad[:-40]}token={TWILIO_TOKEN}", times=None)
    smtp.fail_data(f"451 4.3.0 cannot relay for {SMTP_USER}:{SMTP_PASSWORD}", times=None)
    return env


def gateway_pages(api, smtp, env):
    api.telegram_raw(502, f"<html>502 Bad Gateway: POST {api.telegram_api_base}/bot{BOT_TOKEN}/sendMessage</html>",
                     times=None)
    api.twilio_error(503, None, f"Service Unavailable ({TWILIO_TOKEN})", times=None)
    smtp.fail_data("421 4.7.0 too busy", times=None)
    return env


def wrong_credentials(api, smtp, env):
    """The provider refuses the credentials; the refused ones must not show either."""
    return {**env, "ALERTS_TELEGRAM_BOT_TOKEN": "5123456789:WRONG-token-9876543210abcdef",
            "ALERTS_TWILIO_AUTH_TOKEN": "WRONG-twilio-token-0987654321", "ALERTS_SMTP_PASSWORD": "WRONG-smtp-password-123"}


def timeouts(api, smtp, env):
    api.delay(2.0, times=None)
    smtp.data_delay = 2.0
    return {**env, "ALERTS_HTTP_TIMEOUT_SECONDS": "0.3", "ALERTS_SMTP_TIMEOUT_SECONDS": "0.3"}


def connection_refused(api, smtp, env):
    port = closed_port()
    return {**env, "ALERTS_SMTP_PORT": str(port), "ALERTS_TELEGRAM_API_BASE": f"http://127.0.0.1:{port}",
            "ALERTS_TWILIO_API_BASE": f"http://127.0.0.1:{port}/2010-04-01"}


@pytest.mark.parametrize("scenario", [echoing_servers, gateway_pages, wrong_credentials, timeouts, connection_refused],
                         ids=lambda f: f.__name__)
def test_no_secret_reaches_logs_rows_or_status_whatever_the_provider_does(scenario, env, api, smtp, caplog):
    run_env = scenario(api, smtp, env)
    settings = Settings.from_env(run_env)
    engine = make_engine(env["DATABASE_URL"])
    try:
        with Database(engine).transaction() as conn:
            subscriber(conn)
            add_event(conn)
        with caplog.at_level(logging.DEBUG):  # the root logger: urllib3, alerts, everything
            run_all(engine, settings)
        errors = last_errors(engine)
    finally:
        engine.dispose()
    smtp.data_delay = 0

    assert set(errors) == {"email", "telegram", "sms"}
    assert all(errors.values()), f"every send should have failed: {errors}"
    secrets = SECRETS + tuple(v for k, v in run_env.items() if k.endswith(("TOKEN", "PASSWORD")))
    logs = our_logs(caplog)
    assert_hidden(logs, secrets)
    assert_hidden(json.dumps(errors), secrets)
    assert_hidden(status_output(run_env), secrets)
    if scenario is echoing_servers:  # the capture really saw urllib3's request lines
        assert "/bot***/sendMessage" in caplog.text
        assert errors["telegram"].startswith("telegram 500: ") and "***" in errors["telegram"]


@pytest.mark.parametrize("channel_kind", ["telegram", "sms"])
def test_an_echoed_secret_is_masked_before_the_reason_is_cut_short(channel_kind, api, env):
    pad = "y" * (MAX_DESCRIPTION_CHARS - 15)
    settings = Settings.from_env(env)
    if channel_kind == "telegram":
        api.telegram_error(500, f"{pad}{BOT_TOKEN}")
        channel = TelegramChannel(settings)
    else:
        api.twilio_error(500, 20500, f"{pad}{TWILIO_TOKEN}")
        channel = TwilioSmsChannel(settings)
    with pytest.raises(DeliveryError) as caught:
        channel.send(CHAT_ID if channel_kind == "telegram" else PHONE, TextMessage("hello"))
    channel.close()

    error = caught.value
    assert not error.permanent
    assert error.reason.endswith("***") or error.reason.endswith("…")
    assert_hidden(error.reason + repr(error) + "".join(traceback.format_exception(error)))
    assert error.__cause__ is None and error.__context__ is None


@pytest.mark.parametrize("logger_name", URLLIB3_URL_LOGGERS)
def test_urllib3_loggers_that_print_urls_never_print_the_bot_token(logger_name, api, env, caplog):
    TelegramChannel(Settings.from_env(env)).close()  # registers the credentials with the log filter
    TwilioSmsChannel(Settings.from_env(env)).close()
    url = f"https://api.telegram.org:443/bot{BOT_TOKEN}/sendMessage"
    with caplog.at_level(logging.DEBUG):
        logging.getLogger(logger_name).debug("Incremented Retry for (url='%s'): %r", url, "Retry(total=0)")
        logging.getLogger(logger_name).warning("Retrying after connection broken: %s?token=%s", url, TWILIO_TOKEN)
    assert "api.telegram.org" in caplog.text
    assert_hidden(caplog.text)


def test_provider_redirects_are_not_followed(api, env):
    other = ProviderApi().start()
    try:
        # A 307 would make requests replay the POST to wherever the Location points.
        api._add(Scripted("telegram", 307, b"", headers={"Location": f"{other.base_url}/bot{BOT_TOKEN}/sendMessage"}))
        channel = TelegramChannel(Settings.from_env(env))
        with pytest.raises(DeliveryError) as caught:
            channel.send(CHAT_ID, TextMessage("hello"))
        channel.close()
        assert other.requests == [] and other.telegram_messages == []
        assert caught.value.reason.startswith("telegram 307")
    finally:
        other.stop()


def test_settings_never_show_secrets_or_passwords_inside_urls():
    s = Settings.from_env({
        "DATABASE_URL": "postgresql+psycopg://alerts:pg-PASSWORD-0001@db.internal:5432/alerts",
        "CELERY_BROKER_URL": "redis://:redis-PASSWORD-0002@cache.internal:6379/0",
        "ALERTS_TELEGRAM_API_BASE": "https://proxy:proxy-PASSWORD-0003@tg.internal",
        "ALERTS_SMTP_PASSWORD": SMTP_PASSWORD, "ALERTS_TELEGRAM_BOT_TOKEN": BOT_TOKEN,
        "ALERTS_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
    })
    shown = repr(s) + str(s) + json.dumps(s.redacted()) + f"{s!r}"
    assert_hidden(shown, SECRETS + ("pg-PASSWORD-0001", "redis-PASSWORD-0002", "proxy-PASSWORD-0003"))
    assert "postgresql+psycopg://alerts:***@db.internal:5432/alerts" in shown
    assert s.database_url.endswith("pg-PASSWORD-0001@db.internal:5432/alerts"), "the value itself is intact"


def test_a_bad_setting_is_reported_without_the_secrets_beside_it():
    result = CliRunner().invoke(cli, ["status"], env={
        "ALERTS_SMTP_PORT": "not-a-port", "ALERTS_SMTP_PASSWORD": SMTP_PASSWORD,
        "ALERTS_TELEGRAM_BOT_TOKEN": BOT_TOKEN, "ALERTS_TWILIO_AUTH_TOKEN": TWILIO_TOKEN})
    assert result.exit_code == 2
    assert "ALERTS_SMTP_PORT" in result.output
    assert_hidden(result.output)


# --- SQL: parameterised everywhere ----------------------------------------------------------

# Every place that builds SQL text from Python values, with why it is safe. Each value is
# a constant of our own code (a table name we declared, an integer constant), never input.
DYNAMIC_SQL_ALLOWED = {
    ("alerts/core/db.py", "f'PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}'"),  # module integer constant
    ("alerts/phases/intake.py", "f'ANALYZE {_verdicts.name}'"),  # our temporary table's name
    ("alerts/phases/fanout.py", "f'ANALYZE {_events.name}'"),  # our temporary table's name
    ("alerts/phases/digests.py", "f'ANALYZE {table.name}'"),  # our temporary table's name
}
SQL_CALLS = {"text", "exec_driver_sql", "execute", "executescript", "executemany"}


def sql_sources() -> list[Path]:
    files = [ROOT / "celery_app.py", ROOT / "beat_schedule.py"]
    for folder in ("alerts",):  # the migrations ship inside the package
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if f.exists()]


def dynamic_sql_sites() -> set[tuple[str, str]]:
    """(file, source of the SQL argument) for every SQL call whose text is built at run
    time: an f-string, % or + formatting, or .format() — instead of a literal."""
    sites = set()
    for path in sql_sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name not in SQL_CALLS:
                continue
            arg = node.args[0]
            built = isinstance(arg, (ast.JoinedStr, ast.BinOp)) or (
                isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "format")
            if built:
                sites.add((path.relative_to(ROOT).as_posix(), ast.unparse(arg)))
    return sites


def test_sql_text_is_never_built_from_values_except_our_own_constants():
    assert sql_sources(), "the audit must see the code"
    assert dynamic_sql_sites() == DYNAMIC_SQL_ALLOWED


def test_sql_in_event_fields_is_stored_as_text_and_matches_nothing(db, engine, now):
    hostile = {
        "event_key": "k1'); DROP TABLE users; --",
        "alert_type": "x'||(SELECT 1)||'",  # rejected by the alert_type rule, stored verbatim
        "region": "NL' OR '1'='1",
        "title": "Robert'); DELETE FROM alert_events; --",
        "summary": "\\'; UPDATE users SET plan='pro'; --",
        "severity": 3,
    }
    good = {**hostile, "event_key": "k2", "alert_type": "price_spike"}
    control = {**good, "event_key": "k3", "region": "NL"}
    with db.transaction() as conn:
        nl_user = add_user(conn)
        add_pref(conn, nl_user, region="NL")

    report = ingest_lines(db, [json.dumps(hostile), json.dumps(good), json.dumps(control)])
    results = run_phases(db, ("a", "b"), clock_at(now), Settings(database_url=str(engine.url)), NO_CHANNELS)

    assert (report.stored, report.errors) == (3, [])
    assert results["a"] == {"accepted": 2, "rejected": 1}
    assert results["b"]["deliveries_created"] == 1, "only k3 is in region NL; \"NL' OR '1'='1\" is not"
    with engine.connect() as conn:
        events = {r.event_key: r for r in conn.execute(sa.select(m.alert_events))}
        assert conn.execute(sa.select(sa.func.count()).select_from(m.users)).scalar() == 1
        assert conn.execute(sa.select(m.users.c.plan)).scalar() == "free"
    assert events[hostile["event_key"]].alert_type == hostile["alert_type"]
    assert events["k2"].title == hostile["title"] and events["k2"].region == hostile["region"]


# --- hostile input: urls, sizes, encodings, control characters ----------------------------------

def event(key: str, **changes) -> str:
    return json.dumps({"event_key": key, "alert_type": "price_spike", "region": "NL", "severity": 4,
                       "title": "TTF day-ahead +18%", **changes})


def verdicts(engine) -> dict[str, tuple[str, str | None]]:
    e = m.alert_events
    with engine.connect() as conn:
        return {r.event_key: (r.status, r.reject_reason) for r in conn.execute(sa.select(e.c.event_key, e.c.status, e.c.reject_reason))}


UNSAFE_URLS = [
    "javascript:alert(document.cookie)",
    "JavaScript:alert(1)",
    " javascript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "vbscript:msgbox(1)",
    "www.energyriskiq.com/e/1",  # no scheme
    "//energyriskiq.com/e/1",  # scheme-relative
    "/e/1",
    "ftp://energyriskiq.com/e/1",
    "file:///etc/passwd",
    "https:///e/1",  # no host
    "https://energyriskiq.com@evil.example/e/1",
    "java\nscript:alert(1)",
]


def test_only_http_and_https_urls_pass_intake(db, engine, now):
    lines = [event(f"bad-{n}", url=url) for n, url in enumerate(UNSAFE_URLS)]
    lines += [event("http", url="http://energyriskiq.com/e/1"), event("https", url="HTTPS://energyriskiq.com/e/2"),
              event("none", url=None)]
    assert ingest_lines(db, lines).stored == len(lines)

    counts = run_phase_a(db, clock_at(now), Settings(), NO_CHANNELS)

    judged = verdicts(engine)
    assert counts == {"accepted": 3, "rejected": len(UNSAFE_URLS)}
    for n, url in enumerate(UNSAFE_URLS):
        status, reason = judged[f"bad-{n}"]
        assert status == "rejected" and reason.startswith("url: "), (url, reason)
    assert {judged[k][0] for k in ("http", "https", "none")} == {"ready"}


def test_oversized_fields_are_rejected_naming_the_field_and_nothing_else_is_lost(db, engine, now):
    lines = [
        event("long-title", title="T" * (MAX_TITLE_CHARS + 1)),
        event("long-summary", summary="s" * (MAX_SUMMARY_CHARS + 1)),
        event("long-url", url="https://energyriskiq.com/" + "a" * MAX_URL_CHARS),
        event("longest-ok", title="T" * MAX_TITLE_CHARS, summary="s" * MAX_SUMMARY_CHARS),
    ]
    assert ingest_lines(db, lines).stored == 4

    run_phase_a(db, clock_at(now), Settings(), NO_CHANNELS)

    judged = verdicts(engine)
    assert judged["long-title"] == ("rejected", f"title: longer than {MAX_TITLE_CHARS} characters")
    assert judged["long-summary"] == ("rejected", f"summary: longer than {MAX_SUMMARY_CHARS} characters")
    assert judged["long-url"] == ("rejected", f"url: longer than {MAX_URL_CHARS} characters")
    assert judged["longest-ok"] == ("ready", None)


def hostile_file() -> bytes:
    """Good, oversized, invalid UTF-8, NUL, good — one per line."""
    return b"\n".join([
        event("first").encode(),
        event("huge", payload={"blob": "x" * (MAX_EVENT_BYTES + 10)}).encode(),
        event("latin1").encode().replace(b"TTF", b"TTF \xe9t\xe9"),
        event("nul", title="a\u0000b").encode(),
        event("last", title="\u26a0 Gas \u2013 \U0001F525").encode(),
    ]) + b"\n"


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_alerts_ingest_reports_each_hostile_line_by_number_and_stores_the_good_ones(source, db_url, engine, tmp_path):
    data = hostile_file()
    path = tmp_path / "events.jsonl"
    path.write_bytes(data)
    env = {**os.environ, "DATABASE_URL": db_url}
    args = [sys.executable, "-m", "alerts", "ingest", str(path) if source == "file" else "-"]
    done = subprocess.run(args, input=None if source == "file" else data, capture_output=True, env=env,
                          cwd=ROOT, timeout=60)

    assert done.returncode == 1, done.stderr  # malformed lines are never a silent success
    errors = done.stderr.decode().splitlines()
    assert errors[0].startswith(f"line 2: longer than {MAX_EVENT_BYTES} bytes")
    bad_byte = data.split(b"\n")[2].index(b"\xe9") + 1
    assert errors[1:] == [f"line 3: invalid UTF-8 (byte {bad_byte} of the line)", "line 4: title: contains a NUL character"]
    assert done.stdout.decode().strip() == "stored 2, duplicates 0, malformed 3"
    assert set(verdicts(engine)) == {"first", "last"}


def test_a_giant_line_is_refused_without_being_held_whole(db, engine):
    class CountingFile:
        """A file whose readline reports the most it was asked to hold at once."""

        def __init__(self, data: bytes):
            import io
            self._data, self.largest = io.BytesIO(data), 0

        def readline(self, limit: int = -1) -> bytes:
            line = self._data.readline(limit)
            self.largest = max(self.largest, len(line))
            return line

    giant = b'{"event_key": "giant", "title": "' + b"A" * (20 * 1024 * 1024) + b'"}\n'
    source = CountingFile(giant + event("after").encode() + b"\n")

    report = ingest_lines(db, source)

    assert report.errors == [(1, f"longer than {MAX_EVENT_BYTES} bytes ({len(giant) - 1} bytes); events must be smaller")]
    assert report.stored == 1 and set(verdicts(engine)) == {"after"}
    assert source.largest <= 1024 * 1024 + 2


def test_a_single_oversized_event_from_celery_is_refused(db, engine):
    with pytest.raises(MalformedEvent, match=f"longer than {MAX_EVENT_BYTES} bytes"):
        ingest_event(db, json.loads(event("big", payload={"blob": "x" * MAX_EVENT_BYTES})))
    assert verdicts(engine) == {}


def test_control_characters_and_line_breaks_never_reach_a_subject_or_a_chat(db, engine, live_settings,
                                                                             smtp_server, provider_api):
    title = "Outage\r\nBcc: eve@example.com\r\nX-Evil: 1\x1b[2J\x07\x7f\u0085\u2028end"
    summary = "Line one\r\nline two\x1b]0;pwned\x07\rthree"
    with db.transaction() as conn:
        subscriber(conn)
    assert ingest_lines(db, [event("ctl", title=title, summary=summary)]).stored == 1

    results = run_all(engine, live_settings)

    assert results["c"]["instant"]["sent"] == 3
    with engine.connect() as conn:
        stored = conn.execute(sa.select(m.alert_events.c.title, m.alert_events.c.summary)).one()
    assert stored.title == "Outage Bcc: eve@example.com X-Evil: 1[2J end"
    assert stored.summary == "Line one\nline two]0;pwned\nthree"
    (mail,) = smtp_server.messages
    assert mail.rcpt_tos == ["alice@example.com"]
    headers = mail.data.split(b"\r\n\r\n", 1)[0].decode()
    assert "\nBcc:" not in headers and "\nX-Evil:" not in headers
    assert mail.message["Subject"] == f"[EnergyRiskIQ] HIGH: {stored.title}"
    sent_text = provider_api.telegram_messages[0].text + provider_api.sms_messages[0].body + mail.data.decode()
    assert not any(ch in sent_text for ch in "\x1b\x07\x7f\x85\u2028")


def test_a_title_inserted_directly_is_normalised_by_intake_too(sqlite_url):
    # PostgreSQL refuses NUL in text outright; SQLite stores it, so intake must cope.
    engine = make_engine(sqlite_url)
    db = Database(engine)
    with db.transaction() as conn:
        add_event(conn, event_key="direct", title="Gas\x00 leak\r\nBcc: eve@example.com", summary="a\x00b")
        add_event(conn, event_key="invisible", title="\x00\x1b\u200b\r\n")
    run_phase_a(db, clock_at(NOW), Settings(), NO_CHANNELS)
    with engine.connect() as conn:
        rows = {r.event_key: r for r in conn.execute(sa.select(m.alert_events))}
    engine.dispose()
    assert (rows["direct"].status, rows["direct"].title, rows["direct"].summary) == \
        ("ready", "Gas leak Bcc: eve@example.com", "ab")
    assert (rows["invisible"].status, rows["invisible"].reject_reason) == ("rejected", "title: empty")


def test_status_shows_producer_text_without_terminal_escapes(db_url, db):
    with db.transaction() as conn:
        add_event(conn, event_key="evil\x1b[2J\x1b]0;owned\x07", status="rejected", reject_reason="title: empty")
    result = CliRunner().invoke(cli, ["status"], env={"DATABASE_URL": db_url}, catch_exceptions=False)
    assert result.exit_code == 0
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "evil\\x1b[2J\\x1b]0;owned\\x07: title: empty" in result.output


def test_an_echoed_smtp_password_is_masked_before_the_reason_is_cut_short(channel_settings):
    from alerts.channels.email import SmtpEmailChannel
    from alerts.channels.http import MAX_DESCRIPTION_CHARS
    from alerts.messages import EmailMessage
    from tests.support.fakes.smtp_server import FakeSmtpServer

    with FakeSmtpServer(users={SMTP_USER: SMTP_PASSWORD}) as server:
        # The password straddles the point where the reason is cut.
        server.fail_data("451 4.3.0 " + "x" * (MAX_DESCRIPTION_CHARS - 20) + SMTP_PASSWORD)
        channel = SmtpEmailChannel(replace(channel_settings, smtp_port=server.port, smtp_user=SMTP_USER,
                                           smtp_password=SMTP_PASSWORD))
        with pytest.raises(DeliveryError) as caught:
            channel.send("alice@example.com", EmailMessage(subject="s", text="t", html="<p>t</p>", message_id="<m1@x>"))
        channel.close()
    assert caught.value.reason.startswith("smtp 451 4.3.0 xxx")
    assert_hidden(caught.value.reason + repr(caught.value), (SMTP_PASSWORD,))
