"""Asynchronous bounces and complaints: the VERP envelope sender every email carries, and
`alerts bounce` reading real report shapes (tests/support/reports/: Postfix's and Exim's
DSN layouts, Yahoo's and Microsoft's feedback reports) from stdin, on PostgreSQL and
SQLite — what each changes, and everything it must leave alone."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from alerts.channels.email import SmtpEmailChannel
from alerts.cli import cli
from alerts.core import tables as m
from alerts.core import tokens
from alerts.core.settings import ConfigError, Settings
from alerts.messages import render_digest, render_instant
from alerts.subscribers import bounces
from tests.support.e2e_runner import ROOT, runner_env
from tests.support.factories import WINDOW_END, WINDOW_START, add_delivery, add_digest, add_event, add_pref, add_user
from tests.support.fakes.fixtures import with_fakes

KEY = "k" * 16 + "0123456789abcdef"  # 32 characters
OTHER_KEY = "x" * 40
BOUNCES = "bounces@alerts.example.com"
ADDRESS = "jane.doe@example.com"
REPORTS = Path(__file__).resolve().parents[2] / "support" / "reports"
BOUNCE_ENV = {"ALERTS_SECRET_KEY": KEY, "ALERTS_BOUNCE_ADDRESS": BOUNCES}
POSTFIX_REASON = ("bounce: 5.1.1 550 5.1.1 <jane.doe@example.com>: Recipient address rejected: "
                  "User unknown in virtual mailbox table")
UNREACHABLE_DB = "postgresql://alerts:s3cr3t-db-password@127.0.0.1:9/alerts"


def verp(user_id: int, key: str = KEY) -> str:
    return f"bounces+{tokens.make_bounce_token(key, user_id)}@alerts.example.com"


def report(name: str, bounce_address: str, address: str = ADDRESS) -> bytes:
    text = (REPORTS / name).read_text()
    return text.replace("{{bounce_address}}", bounce_address).replace("{{address}}", address).encode()


def bounce(db_url: str, raw: bytes, *args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["bounce", *args], input=raw,
                              env={"DATABASE_URL": db_url, **BOUNCE_ENV, **(env or {})})


@dataclass
class Jane:
    """A user with rows in every state a bounce or a complaint may touch."""

    id: int
    instant: int  # queued instant email, due
    retried: int  # queued instant email waiting for a retry
    digest: int  # queued email digest
    pending: int  # digest delivery on email not yet in a digest
    sent: int  # instant email already sent
    telegram: int  # queued instant Telegram message


@pytest.fixture
def jane(engine) -> Jane:
    with engine.begin() as conn:
        uid = add_user(conn, email=ADDRESS, telegram_chat_id="424242")
        add_pref(conn, uid, channel="email")
        add_pref(conn, uid, channel="email", alert_type="price_spike", delivery_kind="digest")
        add_pref(conn, uid, channel="telegram")

        def delivery(channel="email", **cols) -> int:
            return add_delivery(conn, uid, add_event(conn, status="fanned_out"), channel=channel, **cols)

        return Jane(
            id=uid, instant=delivery(),
            retried=delivery(attempts=2, next_retry_at=WINDOW_END, last_error="smtp 451 4.3.0 try later"),
            digest=add_digest(conn, uid), pending=delivery(delivery_kind="digest"),
            sent=delivery(status="sent", attempts=1), telegram=delivery("telegram"))


@pytest.fixture
def bob(engine) -> int:
    with engine.begin() as conn:
        uid = add_user(conn, email="bob@example.com")
        add_pref(conn, uid, channel="email")
        add_delivery(conn, uid, add_event(conn, status="fanned_out"))
    return uid


def state(engine, table: sa.Table, row_id: int) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.select(table.c.status, table.c.last_error).where(table.c.id == row_id)).one())


def snapshot(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns))]
                for t in (m.users, m.user_alert_prefs, m.user_alert_deliveries, m.user_alert_digests,
                          m.user_channel_blocks)}


def blocks_of(engine) -> list[tuple]:
    with engine.connect() as conn:
        b = m.user_channel_blocks
        return [tuple(r) for r in conn.execute(sa.select(b.c.user_id, b.c.channel, b.c.address, b.c.reason))]


def prefs_enabled(engine, user_id: int, channel: str) -> list[bool]:
    p = m.user_alert_prefs
    with engine.connect() as conn:
        return conn.execute(sa.select(p.c.enabled).where(p.c.user_id == user_id, p.c.channel == channel)
                            .order_by(p.c.id)).scalars().all()


# --- the token ---------------------------------------------------------------------------------

def test_a_bounce_token_is_lowercase_letters_and_digits_and_names_the_user():
    token = tokens.make_bounce_token(KEY, 42)
    assert re.fullmatch(r"[a-z0-9]+", token)
    assert tokens.read_bounce_token(KEY, token) == 42
    assert tokens.read_bounce_token(KEY, token.upper()) == 42, "an MTA may have changed its case"


@pytest.mark.parametrize("position", [0, 3, -1, -9])
def test_a_bounce_token_with_one_character_changed_is_refused(position):
    chars = list(tokens.make_bounce_token(KEY, 42))
    chars[position] = "9" if chars[position] != "9" else "8"
    with pytest.raises(tokens.BadToken):
        tokens.read_bounce_token(KEY, "".join(chars))


@pytest.mark.parametrize("forged", ["", "42", "42aaaaaaaaaaaaaaaa", "042" + "a" * 16, "x" * 40,
                                    tokens.make_token(KEY, 42, "email")])
def test_anything_but_a_token_we_signed_for_bounces_is_refused(forged):
    with pytest.raises(tokens.BadToken):
        tokens.read_bounce_token(KEY, forged)


def test_a_bounce_token_signed_with_another_key_is_refused():
    with pytest.raises(tokens.BadToken):
        tokens.read_bounce_token(KEY, tokens.make_bounce_token(OTHER_KEY, 42))


def test_the_bounce_token_has_a_purpose_of_its_own():
    """Signed with the same key, neither kind verifies as the other."""
    with pytest.raises(tokens.BadToken):
        tokens.read_token(KEY, tokens.make_bounce_token(KEY, 42))


# --- the setting ----------------------------------------------------------------------------------

def test_the_bounce_address_is_read_and_gives_each_user_an_address_of_their_own():
    settings = Settings.from_env(BOUNCE_ENV)
    assert settings.bounce_address == BOUNCES
    assert tokens.bounce_address(settings, 7) == verp(7) != tokens.bounce_address(settings, 8)
    assert len(tokens.bounce_address(settings, 2**31 - 1).partition("@")[0]) <= 27 + len("bounces")


@pytest.mark.parametrize("value", ["bounces+x@alerts.example.com", "bounces", "@alerts.example.com", "bounces@",
                                   "a b@alerts.example.com", "bounces@@example.com", "x" * 38 + "@example.com",
                                   "<bounces@alerts.example.com>"])
def test_a_bounce_address_that_is_not_local_at_domain_without_a_plus_is_refused(value):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**BOUNCE_ENV, "ALERTS_BOUNCE_ADDRESS": value})
    assert err.value.variable == "ALERTS_BOUNCE_ADDRESS"


@pytest.mark.parametrize("key", [None, "too-short"])
def test_a_bounce_address_needs_the_secret_key(key):
    env = {"ALERTS_BOUNCE_ADDRESS": BOUNCES, **({"ALERTS_SECRET_KEY": key} if key else {})}
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert err.value.variable == "ALERTS_SECRET_KEY"


def test_alerts_bounce_exits_2_naming_the_setting_when_it_is_missing_or_wrong(db_url):
    missing = bounce(db_url, b"", env={"ALERTS_BOUNCE_ADDRESS": ""})
    assert missing.exit_code == 2 and "ALERTS_BOUNCE_ADDRESS" in missing.output
    wrong = bounce(db_url, b"", env={"ALERTS_BOUNCE_ADDRESS": "bounces+x@example.com"})
    assert wrong.exit_code == 2 and "ALERTS_BOUNCE_ADDRESS" in wrong.output
    no_key = bounce(db_url, b"", env={"ALERTS_SECRET_KEY": ""})
    assert no_key.exit_code == 2 and "ALERTS_SECRET_KEY" in no_key.output


# --- the envelope sender ------------------------------------------------------------------------------

EVENT = {"id": 7, "event_key": "e7", "alert_type": "pipeline_outage", "region": "NL", "severity": 3,
         "title": "Flow cut at Emden", "summary": "Compressor trip", "url": None, "collapse_key": None,
         "created_at": datetime(2026, 5, 12, 9, tzinfo=timezone.utc)}
DIGEST = {"digest_key": "daily:42:email:2026-05-11T22:00:00Z", "user_id": 42, "channel": "email", "period": "daily",
          "window_start": WINDOW_START, "window_end": WINDOW_END, "timezone": "Europe/Amsterdam"}


def test_every_email_instant_and_digest_names_the_users_bounce_address_as_its_envelope_sender(settings):
    verp_settings = replace(settings, secret_key=KEY, bounce_address=BOUNCES)
    instant = render_instant("email", {**EVENT, "user_id": 42}, delivery_id=1, settings=verp_settings)
    digest = render_digest("email", DIGEST, [EVENT], settings=verp_settings)
    assert instant.envelope_from == digest.envelope_from == verp(42)
    assert render_instant("email", {**EVENT, "user_id": 42}, delivery_id=1, settings=settings).envelope_from is None


def test_the_smtp_channel_sends_from_the_bounce_address_and_leaves_the_from_header_alone(settings, smtp_server):
    verp_settings = with_fakes(replace(settings, secret_key=KEY, bounce_address=BOUNCES), smtp_server)
    channel = SmtpEmailChannel(verp_settings)
    try:
        channel.send(ADDRESS, render_instant("email", {**EVENT, "user_id": 42}, delivery_id=1,
                                             settings=verp_settings))
        channel.send(ADDRESS, render_instant("email", {**EVENT, "user_id": 42}, delivery_id=2, settings=settings))
    finally:
        channel.close()
    with_verp, without = smtp_server.messages
    assert with_verp.mail_from == verp(42)
    assert without.mail_from == "alerts@energyriskiq.com"
    assert with_verp.message["From"] == without.message["From"] == settings.email_from


# --- permanent failures block ----------------------------------------------------------------------------

def test_a_postfix_dsn_with_a_permanent_failure_blocks_the_users_email_as_a_550_at_rcpt_does(db_url, engine, jane):
    result = bounce(db_url, report("postfix_dsn.eml", verp(jane.id)))

    assert result.exit_code == 0, result.output
    assert result.stdout == f"blocked email of user {jane.id} ({POSTFIX_REASON}); 3 queued row(s) skipped\n"
    assert blocks_of(engine) == [(jane.id, "email", ADDRESS, POSTFIX_REASON)]
    disabled = ("skipped", m.destination_disabled(POSTFIX_REASON))
    assert state(engine, m.user_alert_deliveries, jane.instant) == disabled
    assert state(engine, m.user_alert_deliveries, jane.retried) == disabled
    assert state(engine, m.user_alert_digests, jane.digest) == disabled
    assert state(engine, m.user_alert_deliveries, jane.pending) == ("queued", None), \
        "as after a 550: Phase D builds it, and the sender skips the blocked destination"
    assert state(engine, m.user_alert_deliveries, jane.sent) == ("sent", None)
    assert state(engine, m.user_alert_deliveries, jane.telegram) == ("queued", None)
    assert prefs_enabled(engine, jane.id, "email") == [True, True], "a bounce is no unsubscribe"


def test_an_exim_dsn_blocks_with_its_own_status_and_diagnostic(db_url, engine, jane):
    result = bounce(db_url, report("exim_dsn.eml", verp(jane.id)))

    assert result.exit_code == 0, result.output
    assert blocks_of(engine) == [(jane.id, "email", ADDRESS, "bounce: 5.0.0 550 5.1.1 No such user here")]


def test_the_final_recipient_is_compared_without_regard_to_case(db_url, engine, jane):
    result = bounce(db_url, report("exim_dsn.eml", verp(jane.id), address="Jane.Doe@EXAMPLE.com"))

    assert result.stdout.startswith(f"blocked email of user {jane.id}")
    assert blocks_of(engine)[0][2] == ADDRESS, "the block holds the address the sender uses"


def test_a_blocked_email_is_skipped_by_the_sender_without_a_send(db_url, engine, settings, jane, smtp_server, now):
    from alerts.phases.pipeline import run_phases, session
    from tests.support.clock import clock_at

    bounce(db_url, report("postfix_dsn.eml", verp(jane.id)))
    with engine.begin() as conn:
        later = add_delivery(conn, jane.id, add_event(conn, status="fanned_out"))
    live = with_fakes(settings, smtp_server)
    with session(engine, live) as (db, channels):
        run_phases(db, ("c",), clock_at(now), live, channels)

    assert state(engine, m.user_alert_deliveries, later) == ("skipped", m.destination_disabled(POSTFIX_REASON))
    assert all(rcpt != ADDRESS for rcpt, _ in smtp_server.rcpt_log)


# --- abuse reports unsubscribe ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["yahoo_arf.eml", "microsoft_arf.eml"])
def test_an_abuse_report_unsubscribes_the_users_email_as_the_one_click_post_does(db_url, engine, jane, name):
    result = bounce(db_url, report(name, verp(jane.id)))

    assert result.exit_code == 0, result.output
    assert result.stdout == (f"unsubscribed user {jane.id} from email (abuse report): 2 subscription(s) off, "
                             "4 queued row(s) skipped\n")
    assert prefs_enabled(engine, jane.id, "email") == [False, False]
    assert prefs_enabled(engine, jane.id, "telegram") == [True]
    for table, row in [(m.user_alert_deliveries, jane.instant), (m.user_alert_deliveries, jane.retried),
                       (m.user_alert_digests, jane.digest), (m.user_alert_deliveries, jane.pending)]:
        assert state(engine, table, row) == ("skipped", m.UNSUBSCRIBED)
    assert state(engine, m.user_alert_deliveries, jane.telegram) == ("queued", None)
    assert blocks_of(engine) == [], "a complaint is no block: the address works, the reader does not want it"


def test_a_feedback_report_that_is_not_abuse_changes_nothing(db_url, engine, jane):
    raw = report("yahoo_arf.eml", verp(jane.id)).replace(b"Feedback-Type: abuse", b"Feedback-Type: not-spam")
    before = snapshot(engine)

    result = bounce(db_url, raw)

    assert (result.exit_code, result.stdout) == (0, "nothing done: feedback report of type not-spam, not abuse\n")
    assert snapshot(engine) == before


# --- everything else changes nothing ----------------------------------------------------------------------------

def test_a_temporary_failure_changes_nothing(db_url, engine, jane):
    before = snapshot(engine)
    result = bounce(db_url, report("postfix_delayed_dsn.eml", verp(jane.id)))

    assert (result.exit_code, result.stdout) == (0, f"nothing done: temporary failure (4.4.1) for user {jane.id}\n")
    assert snapshot(engine) == before


@pytest.mark.parametrize("name", ["postfix_dsn.eml", "yahoo_arf.eml"])
@pytest.mark.parametrize("forged", ["bounces+{id}aaaaaaaaaaaaaaaa@alerts.example.com",  # a guessed signature
                                    "bounces+{other_key}@alerts.example.com",  # signed with another key
                                    "bounces@alerts.example.com"],  # no token at all
                         ids=["guessed", "other-key", "missing"])
def test_a_report_without_an_authentic_token_changes_nothing(db_url, engine, jane, name, forged):
    address = forged.format(id=jane.id, other_key=tokens.make_bounce_token(OTHER_KEY, jane.id))
    before = snapshot(engine)

    result = bounce(db_url, report(name, address))

    assert result.exit_code == 0
    assert re.fullmatch(r"nothing done: .* without an authentic bounce token\n", result.stdout)
    assert snapshot(engine) == before


def test_a_dsn_whose_token_names_another_user_blocks_nobody(db_url, engine, jane, bob):
    """Bob's token on a report about Jane's address: neither is blocked."""
    before = snapshot(engine)
    result = bounce(db_url, report("postfix_dsn.eml", verp(bob)))

    assert (result.exit_code, result.stdout) == (
        0, f"nothing done: the bounce is for j***@example.com, not the current email of user {bob}\n")
    assert snapshot(engine) == before


def test_a_dsn_for_an_address_the_user_has_since_changed_changes_nothing(db_url, engine, jane):
    with engine.begin() as conn:
        conn.execute(sa.update(m.users).where(m.users.c.id == jane.id).values(email="jane@new.example.com"))
    before = snapshot(engine)

    result = bounce(db_url, report("postfix_dsn.eml", verp(jane.id)))

    assert result.exit_code == 0
    assert result.stdout.startswith("nothing done: the bounce is for j***@example.com, not the current email")
    assert snapshot(engine) == before


@pytest.mark.parametrize("raw", [b"", b"\x00\xff\xfe not mail at all", b"Subject: hi\n\nhello\n"])
def test_anything_that_is_not_a_report_changes_nothing(db_url, engine, jane, raw):
    before = snapshot(engine)
    result = bounce(db_url, raw)
    assert (result.exit_code, result.stdout) == (
        0, "nothing done: not a delivery status notification or an abuse feedback report\n")
    assert snapshot(engine) == before


def test_a_plain_message_to_the_bounce_address_changes_nothing_even_with_an_authentic_token(db_url, engine, jane):
    before = snapshot(engine)
    result = bounce(db_url, report("out_of_office.eml", verp(jane.id)))
    assert result.stdout == "nothing done: not a delivery status notification or an abuse feedback report\n"
    assert snapshot(engine) == before


def test_a_report_of_a_user_deleted_since_changes_nothing(db_url, engine):
    result = bounce(db_url, report("postfix_dsn.eml", verp(999)))
    assert (result.exit_code, result.stdout) == (0, "nothing done: user 999 no longer exists\n")
    assert blocks_of(engine) == []


# --- where the token is looked for -------------------------------------------------------------------------------

def test_the_recipient_option_is_looked_at_before_the_reports_headers(db_url, engine, jane, bob):
    """The report's headers name Bob; the MTA says it was delivered to Jane's address."""
    raw = report("exim_dsn.eml", verp(bob))
    result = bounce(db_url, raw, "--recipient", verp(jane.id))
    assert result.stdout.startswith(f"blocked email of user {jane.id}")


def test_the_first_authentic_token_wins_a_forged_one_before_it_is_passed_over(db_url, engine, jane):
    forged = f"bounces+{jane.id}aaaaaaaaaaaaaaaa@alerts.example.com"
    result = bounce(db_url, report("exim_dsn.eml", verp(jane.id)), "--recipient", forged)
    assert result.stdout.startswith(f"blocked email of user {jane.id}")


def test_the_original_messages_return_path_is_looked_at_last(db_url, engine, jane):
    """A DSN whose own headers were rewritten (no token there) still names the user through
    the original message it carries."""
    raw = report("postfix_dsn.eml", verp(jane.id))
    head, sep, rest = raw.partition(b"Content-Description: Undelivered Message Headers")
    head = head.replace(verp(jane.id).encode(), b"bounces@alerts.example.com")
    result = bounce(db_url, head + sep + rest)
    assert result.stdout.startswith(f"blocked email of user {jane.id}")


def test_the_local_part_of_the_bounce_address_is_matched_in_any_case(db_url, engine, jane):
    result = bounce(db_url, report("postfix_dsn.eml", verp(jane.id).upper()))
    assert result.stdout.startswith(f"blocked email of user {jane.id}")


def test_reading_a_report_uses_the_standard_parser_and_keeps_each_recipients_status():
    parsed = bounces.read_report(report("postfix_dsn.eml", verp(3)))
    assert parsed.kind == bounces.DSN
    (recipient,) = parsed.recipients
    assert (recipient.final_recipient, recipient.status, recipient.permanent) == (ADDRESS, "5.1.1", True)


# --- the database ------------------------------------------------------------------------------------------------

def test_an_unreachable_database_exits_75_with_one_line_naming_database_url(jane):
    result = bounce(UNREACHABLE_DB, report("postfix_dsn.eml", verp(jane.id)))

    assert result.exit_code == 75, "EX_TEMPFAIL: the MTA keeps the report and tries again"
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: DATABASE_URL postgresql://alerts:***@127.0.0.1:9/alerts: cannot reach")
    assert "s3cr3t-db-password" not in result.output


def test_a_report_that_needs_no_change_needs_no_database():
    result = bounce(UNREACHABLE_DB, report("postfix_dsn.eml", "bounces@alerts.example.com"))
    assert result.exit_code == 0


# --- end to end -------------------------------------------------------------------------------------------------------

def test_end_to_end_the_smtp_envelope_carries_the_token_and_its_dsn_blocks_the_user(pg_url, conn, smtp_server):
    """An email goes out through the real SMTP channel; the MAIL FROM the server saw comes
    back in a Postfix DSN, piped into `alerts bounce` as an MTA would; the next alert for
    that address is skipped without a send."""
    uid = add_user(conn, email=ADDRESS)
    add_pref(conn, uid, channel="email")
    add_event(conn, created_at=datetime.now(timezone.utc) - timedelta(minutes=1))
    env = runner_env(pg_url, smtp_server, **BOUNCE_ENV)

    def run() -> None:
        subprocess.run([sys.executable, "-m", "alerts.runner", "--phase", "all"], env=env, cwd=ROOT, check=True,
                       capture_output=True, timeout=120)

    run()
    (mail,) = smtp_server.messages
    assert mail.mail_from == verp(uid)
    assert mail.message["From"] == Settings().email_from

    piped = subprocess.run([sys.executable, "-m", "alerts", "bounce", "--recipient", mail.mail_from],
                           input=report("postfix_dsn.eml", mail.mail_from), env=env, cwd=ROOT,
                           capture_output=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.decode().startswith(f"blocked email of user {uid} (bounce: 5.1.1 550 5.1.1")

    add_event(conn, created_at=datetime.now(timezone.utc))
    run()
    assert len(smtp_server.messages) == 1, "nothing more was sent to the bounced address"
    skipped = conn.execute(sa.select(m.user_alert_deliveries.c.last_error)
                           .where(m.user_alert_deliveries.c.status == m.SKIPPED)).scalars().all()
    assert skipped == [m.destination_disabled(POSTFIX_REASON)]
