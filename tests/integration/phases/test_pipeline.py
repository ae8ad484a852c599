"""Digests end to end, as an operator runs them: events in through `alerts ingest`, then
`python -m alerts.runner` processes, out to the fake SMTP server and Telegram API."""
from __future__ import annotations

import re

import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.db import make_engine
from tests.support.e2e_runner import (email_event_ids, event, finish, html_part, ingest, plain_part, run_phase,
                              runner_env, start_phase, telegram_event_ids)
from tests.support.factories import add_pref, add_user, rows
from tests.support.telegram_html import parse_telegram_html, telegram_units

# 2026-05-12 in Europe/Amsterdam (UTC+2) is [2026-05-11T22:00Z, 2026-05-12T22:00Z).
IN_WINDOW = ["2026-05-12T07:00:00+00:00", "2026-05-12T09:00:00+00:00", "2026-05-12T15:00:00+00:00"]
BEFORE_CLOSE = "2026-05-12T21:59:00+00:00"
AFTER_CLOSE = "2026-05-12T22:01:00+00:00"
NEXT_MORNING = "2026-05-13T09:00:00+00:00"
APP_URL = "https://app.energyriskiq.com"
NO_SENDS = {"sent": 0, "retried": 0, "failed": 0, "skipped": 0}
HOSTILE_TITLE = """<script>alert("x")</script> & 'Rotterdam' "LNG" </b>"""
HOSTILE_SUMMARY = "Flow < 50% & falling > <i>fast</i>"


def seed(url: str, **channels_kinds: str) -> dict[str, int]:
    """One Amsterdam user per ``name=channel:kind`` with a pref for any event."""
    engine = make_engine(url)
    users = {}
    with engine.begin() as conn:
        for name, spec in channels_kinds.items():
            channel, kind = spec.split(":")
            users[name] = add_user(conn, email=f"{name}@example.com", telegram_chat_id=str(4000 + len(users)))
            add_pref(conn, users[name], channel=channel, delivery_kind=kind)
    engine.dispose()
    return users


def table(url: str, t: sa.Table) -> list[dict]:
    engine = make_engine(url)
    with engine.connect() as conn:
        found = rows(conn, t)
    engine.dispose()
    return found


def event_ids(url: str) -> list[int]:
    return [e["id"] for e in table(url, m.alert_events)]


def items(url: str) -> dict[int, list[int]]:
    """digest id -> the event ids of its items."""
    engine = make_engine(url)
    i, d = m.user_alert_digest_items, m.user_alert_deliveries
    with engine.connect() as conn:
        found: dict[int, list[int]] = {}
        for row in conn.execute(sa.select(i.c.digest_id, d.c.alert_event_id)
                                .select_from(i.join(d, d.c.id == i.c.delivery_id))):
            found.setdefault(row.digest_id, []).append(row.alert_event_id)
    engine.dispose()
    return {key: sorted(value) for key, value in found.items()}


def test_three_events_of_one_amsterdam_day_arrive_as_one_digest_once_its_window_closes(db_url, smtp_server):
    users = seed(db_url, ann="email:digest")
    env = runner_env(db_url, smtp_server)
    assert ingest(env, [event(f"seed-{n}", at) for n, at in enumerate(IN_WINDOW)])["stored"] == 3

    assert run_phase(env, "a", BEFORE_CLOSE)["a"] == {"accepted": 3, "rejected": 0}
    assert run_phase(env, "b", BEFORE_CLOSE)["b"] == {"events_fanned_out": 3, "deliveries_created": 3}
    assert run_phase(env, "d", BEFORE_CLOSE)["d"] == {
        "digests_created": 1, "digest_items_attached": 3, "deliveries_marked_batched": 3}
    (digest,) = table(db_url, m.user_alert_digests)
    assert items(db_url) == {digest["id"]: event_ids(db_url)}

    before = run_phase(env, "c", BEFORE_CLOSE)["c"]
    assert before == {"instant": NO_SENDS, "digests": NO_SENDS}
    assert smtp_server.messages == []

    assert run_phase(env, "c", AFTER_CLOSE)["c"]["digests"] == {**NO_SENDS, "sent": 1}
    (mail,) = smtp_server.messages
    assert mail.rcpt_tos == ["ann@example.com"]
    assert sorted(email_event_ids(mail)) == event_ids(db_url)
    assert mail.message["X-Alerts-Digest-Key"] == digest["digest_key"]
    assert "(3 alerts)" in mail.message["Subject"]

    for now in (AFTER_CLOSE, NEXT_MORNING):
        again = run_phase(env, "all", now)
        assert again["d"]["digests_created"] == 0
        assert again["c"] == {"instant": NO_SENDS, "digests": NO_SENDS}
    assert len(smtp_server.messages) == 1
    (sent,) = table(db_url, m.user_alert_digests)
    assert (sent["user_id"], sent["status"], sent["attempts"]) == (users["ann"], "sent", 1)


def test_a_late_event_after_its_windows_digest_was_sent_comes_in_a_follow_up_with_only_itself(pg_url, smtp_server):
    seed(pg_url, ann="email:digest")
    env = runner_env(pg_url, smtp_server)
    ingest(env, [event("early-1", IN_WINDOW[0]), event("early-2", IN_WINDOW[1])])
    assert run_phase(env, "all", AFTER_CLOSE)["c"]["digests"]["sent"] == 1
    early = event_ids(pg_url)

    ingest(env, [event("late", "2026-05-12T21:30:00+00:00")])  # same window, arrives after it was sent
    late_run = run_phase(env, "all", NEXT_MORNING)
    assert late_run["d"] == {"digests_created": 1, "digest_items_attached": 1, "deliveries_marked_batched": 1}
    assert late_run["c"]["digests"]["sent"] == 1

    first, follow_up = table(pg_url, m.user_alert_digests)
    (late_id,) = sorted(set(event_ids(pg_url)) - set(early))
    assert items(pg_url) == {first["id"]: early, follow_up["id"]: [late_id]}
    assert (follow_up["window_start"], follow_up["window_end"]) == (first["window_start"], first["window_end"])
    assert follow_up["digest_key"] != first["digest_key"]
    first_mail, second_mail = smtp_server.messages
    assert sorted(email_event_ids(first_mail)) == early
    assert email_event_ids(second_mail) == [late_id]
    assert second_mail.message["X-Alerts-Digest-Key"] == follow_up["digest_key"]
    assert second_mail.message["Message-ID"] != first_mail.message["Message-ID"]


def test_300_events_in_one_window_make_one_telegram_message_that_fits_and_counts_the_rest(pg_url, provider_api):
    users = seed(pg_url, tom="telegram:digest")
    env = runner_env(pg_url, api=provider_api, ALERTS_APP_BASE_URL=APP_URL)
    events = [event(f"many-{n}", f"2026-05-12T{n % 20:02d}:{n % 60:02d}:00+00:00", severity=1 + n % 5,
                    title=f"Compressor station {n} trip ⚡ & pressure drop on the northern corridor",
                    summary="Nominations cut <50% for the next gas day")
              for n in range(300)]
    assert ingest(env, events)["stored"] == 300

    result = run_phase(env, "all", AFTER_CLOSE)
    assert result["d"]["digest_items_attached"] == 300
    assert result["c"]["digests"] == {**NO_SENDS, "sent": 1}
    (message,) = provider_api.telegram_messages
    assert message.chat_id == "4000" and message.parse_mode.lower() == "html" and message.preview_disabled
    assert telegram_units(message.text) <= 4096
    shown_text = parse_telegram_html(message.text)
    more = re.search(r"…and (\d+) more\s*(?:View in app\s*)?$", shown_text)
    assert more, shown_text[-200:]
    shown = telegram_event_ids(message.text)
    assert len(set(shown)) == len(shown) > 0
    assert int(more.group(1)) + len(shown) == 300
    severity = {e["id"]: e["severity"] for e in table(pg_url, m.alert_events)}
    hidden = set(severity) - set(shown)
    assert min(severity[i] for i in shown) >= max(severity[i] for i in hidden), "the most severe are kept"
    assert re.search(f'…and {more.group(1)} more\n<a href="{re.escape(APP_URL)}[^"]*">View in app</a>$', message.text)
    assert users["tom"] == table(pg_url, m.user_alert_digests)[0]["user_id"]


def test_hostile_event_text_arrives_escaped_in_html_email_and_telegram_instant_and_digest(
        pg_url, smtp_server, provider_api):
    seed(pg_url, ivy="email:instant", dan="email:digest", tia="telegram:instant", taz="telegram:digest")
    env = runner_env(pg_url, smtp_server, provider_api)
    ingest(env, [event("hostile", IN_WINDOW[0], title=HOSTILE_TITLE, summary=HOSTILE_SUMMARY,
                       url="https://energyriskiq.com/e/1?a=1&b=2")])

    result = run_phase(env, "all", AFTER_CLOSE)
    assert result["a"]["accepted"] == 1
    assert result["c"]["instant"]["sent"] == 2 and result["c"]["digests"]["sent"] == 2
    assert sorted(mail.rcpt_tos[0] for mail in smtp_server.messages) == ["dan@example.com", "ivy@example.com"]
    for mail in smtp_server.messages:
        html, text = html_part(mail), plain_part(mail)
        assert "<script>" not in html and "<i>fast</i>" not in html
        assert "&lt;script&gt;alert(" in html and "&lt;/b&gt;" in html and "&amp; falling &gt;" in html
        assert 'href="https://energyriskiq.com/e/1?a=1&amp;b=2"' in html
        assert HOSTILE_TITLE in text and HOSTILE_SUMMARY in text  # plain text stays plain
    assert len(provider_api.telegram_messages) == 2
    for message in provider_api.telegram_messages:
        assert "<script>" not in message.text and "<i>fast</i>" not in message.text
        shown = parse_telegram_html(message.text)
        assert HOSTILE_TITLE in shown and HOSTILE_SUMMARY in shown


def test_running_everything_twice_at_once_and_again_sends_each_digest_once(pg_url, smtp_server, provider_api):
    seed(pg_url, bo="email:digest", bea="telegram:digest")
    env = runner_env(pg_url, smtp_server, provider_api)
    ingest(env, [event(f"twice-{n}", at) for n, at in enumerate(IN_WINDOW)])

    runs = [finish(p) for p in [start_phase(env, "all", AFTER_CLOSE), start_phase(env, "all", AFTER_CLOSE)]]
    runs.append(run_phase(env, "all", AFTER_CLOSE))
    sent = sum(run["c"]["digests"]["sent"] for run in runs if "locked" not in run["c"])
    assert sent == 2
    assert len(smtp_server.messages) == 1 and len(provider_api.telegram_messages) == 1
    assert sorted(email_event_ids(smtp_server.messages[0])) == event_ids(pg_url)
    assert sorted(telegram_event_ids(provider_api.telegram_messages[0].text)) == event_ids(pg_url)
    assert [d["status"] for d in table(pg_url, m.user_alert_digests)] == ["sent", "sent"]
