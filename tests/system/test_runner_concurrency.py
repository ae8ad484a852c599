"""Several runner processes at once on one PostgreSQL database (docs/architecture.md locks):
every message leaves exactly once, every digest delivery ends in exactly one sent
digest, and a phase whose lock is taken reports `locked` and exits 0."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.db import lock_key, make_engine
from tests.support.e2e_runner import (ROOT, RUN_TIMEOUT_SECONDS, email_event_ids, finish, run_phase, runner_env,
                              start_phase, telegram_event_ids)
from tests.support.factories import add_delivery, add_event, add_pref, add_user, rows
from tests.support.telegram_html import parse_telegram_html

NOW = "2026-05-13T00:00:00+00:00"  # after the 2026-05-11 and 2026-05-12 Amsterdam days have closed
# Event times in the two closed windows the producer alternates between.
RACE_EVENT_TIMES = ["2026-05-11T08:00:00+00:00", "2026-05-12T09:30:00+00:00", "2026-05-12T21:59:00+00:00"]
RUNNERS = 4
ITEM_INSERT_PAUSE_SECONDS = 0.2
QUEUED = 500


def select_all(url: str, table: sa.Table, order_by: str = "id") -> list[dict]:
    engine = make_engine(url)
    with engine.connect() as conn:
        found = rows(conn, table, order_by)
    engine.dispose()
    return found


# --- many instant deliveries, several runners ------------------------------------------------

def seed_instant_deliveries(url: str, users: int = 50, per_user: int = QUEUED // 50) -> dict[int, str]:
    """Queued instant email deliveries; returns delivery id -> recipient."""
    engine = make_engine(url)
    recipients = {}
    with engine.begin() as conn:
        events = [add_event(conn, status="fanned_out") for _ in range(per_user)]
        for n in range(users):
            email = f"many{n}@example.com"
            user = add_user(conn, email=email)
            for event_id in events:
                recipients[add_delivery(conn, user, event_id)] = email
    engine.dispose()
    return recipients


def delivery_of(mail) -> int:
    """The delivery id in an instant email's deterministic Message-ID."""
    return int(re.fullmatch(r"<alert-delivery-(\d+)\.[0-9a-f]+@[^>]+>", mail.message["Message-ID"]).group(1))


@pytest.mark.parametrize("phase", ["c", "all"])
def test_four_runners_at_once_send_each_of_500_instant_emails_exactly_once(pg_url, smtp_server, phase):
    recipients = seed_instant_deliveries(pg_url)
    assert len(recipients) == QUEUED
    # Small claim batches, so that whoever runs Phase C claims many times.
    env = runner_env(pg_url, smtp_server, ALERTS_SEND_BATCH_SIZE="20")

    runs = [finish(p) for p in [start_phase(env, phase, NOW) for _ in range(RUNNERS)]]

    assert sum(run["c"]["instant"]["sent"] for run in runs if not run["c"].get("locked")) == QUEUED
    received = Counter(delivery_of(mail) for mail in smtp_server.messages)
    assert len(smtp_server.messages) == QUEUED
    assert set(received) == set(recipients) and set(received.values()) == {1}
    for mail in smtp_server.messages:
        assert mail.rcpt_tos == [recipients[delivery_of(mail)]]
    deliveries = select_all(pg_url, m.user_alert_deliveries)
    assert {(d["status"], d["attempts"]) for d in deliveries} == {("sent", 1)}


def test_four_senders_without_the_phase_lock_still_send_each_email_exactly_once(pg_url, smtp_server, tmp_path):
    """As the Celery send tasks do: no advisory lock, only FOR UPDATE SKIP LOCKED claims."""
    recipients = seed_instant_deliveries(pg_url)
    env = runner_env(pg_url, smtp_server, ALERTS_SEND_BATCH_SIZE="10")
    go = tmp_path / "go"
    senders = [subprocess.Popen([sys.executable, "-m", "tests.support.e2e_race", "send", "--now", NOW, "--go", str(go)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(RUNNERS)]
    for _ in range(3000):
        if len(list(tmp_path.glob("go.ready.*"))) == RUNNERS:
            break
        time.sleep(0.01)
    go.touch()
    counts = [finish(p) for p in senders]

    assert sum(c["sent"] for c in counts) == QUEUED
    assert sum(1 for c in counts if c["sent"]) > 1, "the senders really ran side by side"
    received = Counter(delivery_of(mail) for mail in smtp_server.messages)
    assert set(received) == set(recipients) and set(received.values()) == {1}
    assert {(d["status"], d["attempts"]) for d in select_all(pg_url, m.user_alert_deliveries)} == {("sent", 1)}


# --- Phase D and Phase C racing while digest deliveries keep arriving --------------------------

def seed_race_users(url: str) -> dict[tuple[int, str], str]:
    """Digest users on email, Telegram or both, and one instant email user.
    Returns (user id, channel) -> address, for every digest subscription."""
    engine = make_engine(url)
    subscriptions = {}
    with engine.begin() as conn:
        for n, channels in enumerate([("email",), ("email",), ("telegram",), ("telegram",), ("email", "telegram")]):
            user = add_user(conn, email=f"race{n}@example.com", telegram_chat_id=str(7000 + n))
            for channel in channels:
                add_pref(conn, user, channel=channel, delivery_kind="digest")
                subscriptions[(user, channel)] = f"race{n}@example.com" if channel == "email" else str(7000 + n)
        add_pref(conn, add_user(conn, email="instant@example.com"), channel="email", delivery_kind="instant")
    engine.dispose()
    return subscriptions


def start_loop(env: dict, phase: str, stop, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.support.e2e_race", "loop", "--phase", phase, "--now", NOW,
                             "--stop", str(stop)], env=env, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def slow_item_inserts(pg_url):
    """Phase D pauses inside its transaction after choosing the digests it attaches items
    to: a sender that could claim one of those meanwhile gets every chance to."""
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION e2e_slow_items() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_sleep({ITEM_INSERT_PAUSE_SECONDS}); RETURN NULL; END $$")
        conn.exec_driver_sql("CREATE TRIGGER e2e_slow_items BEFORE INSERT ON user_alert_digest_items "
                             "FOR EACH STATEMENT EXECUTE FUNCTION e2e_slow_items()")
    yield
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER e2e_slow_items ON user_alert_digest_items")
        conn.exec_driver_sql("DROP FUNCTION e2e_slow_items()")
    engine.dispose()


@pytest.mark.parametrize("sender", ["c", "tasks"])
def test_phase_d_and_phase_c_looping_while_digest_deliveries_arrive_lose_and_repeat_nothing(
        pg_url, slow_item_inserts, smtp_server, provider_api, tmp_path, sender):
    """``sender`` "c": the runner's Phase C; "tasks": one send per row as the Celery send
    tasks do, whose claim and load go to the server together."""
    subscriptions = seed_race_users(pg_url)
    env = runner_env(pg_url, smtp_server, provider_api)
    stop = tmp_path / "stop"
    logs = {phase: open(tmp_path / f"{phase}.jsonl", "w") for phase in ("d", "c")}
    loops = {phase: start_loop(env, sender if phase == "c" else phase, stop, logs[phase]) for phase in ("d", "c")}
    try:
        producer = subprocess.run(
            [sys.executable, "-m", "tests.support.e2e_race", "produce", "--batches", "12", "--size", "5",
             "--created-at", *RACE_EVENT_TIMES], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=RUN_TIMEOUT_SECONDS)
    finally:
        stop.touch()
        errors = {phase: proc.communicate(timeout=RUN_TIMEOUT_SECONDS)[1] for phase, proc in loops.items()}
        for f in logs.values():
            f.close()
    assert producer.returncode == 0, producer.stderr
    for phase, proc in loops.items():
        assert proc.returncode == 0, f"{phase} loop: {errors[phase]}"
    loop_runs = {phase: [json.loads(line) for line in (tmp_path / f"{phase}.jsonl").read_text().splitlines()]
                 for phase in ("d", "c")}
    # The producer waited for a digest sent by the C loop before its second half.
    assert sum(run["d"].get("digests_created", 0) for run in loop_runs["d"]) > 0
    assert sum(run["c"].get("digests", {}).get("sent", 0) for run in loop_runs["c"]) > 0

    drain = run_phase(env, "all", NOW)  # whatever arrived after the loops' last runs
    assert drain["a"] == {"accepted": 0, "rejected": 0} and drain["b"]["events_fanned_out"] == 0
    settled = run_phase(env, "all", NOW)
    assert settled["d"]["digests_created"] == 0 and settled["c"]["digests"]["sent"] == 0

    event_times = {e["id"]: e["created_at"] for e in select_all(pg_url, m.alert_events)}
    events = set(event_times)
    assert len(events) == 60
    deliveries = select_all(pg_url, m.user_alert_deliveries)
    digests = {g["id"]: g for g in select_all(pg_url, m.user_alert_digests)}
    items = {i["delivery_id"]: i["digest_id"] for i in select_all(pg_url, m.user_alert_digest_items, "delivery_id")}

    # Nothing lost: each digest delivery is in exactly one digest (delivery_id is UNIQUE in
    # the items), that digest is sent and is the digest of its user, channel and window.
    digest_deliveries = [d for d in deliveries if d["delivery_kind"] == "digest"]
    assert len(digest_deliveries) == len(events) * len(subscriptions) == len(items)
    for d in digest_deliveries:
        assert (d["status"], d["last_error"]) == ("skipped", "batched_into_digest")
        digest = digests[items[d["id"]]]
        assert digest["status"] == "sent" and (digest["user_id"], digest["channel"]) == (d["user_id"], d["channel"])
        assert digest["window_start"] <= event_times[d["alert_event_id"]] < digest["window_end"]
    assert {g["status"] for g in digests.values()} == {"sent"}
    assert any(g["sequence"] > 0 for g in digests.values()), "deliveries arrived after their window was sent"
    instant = [d for d in deliveries if d["delivery_kind"] == "instant"]
    assert len(instant) == len(events) and {d["status"] for d in instant} == {"sent"}

    # What users received: one message per sent digest, no event twice per user and channel,
    # and every event each subscriber was due.
    event_of = {d["id"]: d["alert_event_id"] for d in deliveries}
    digest_items: dict[int, list[int]] = defaultdict(list)
    for delivery_id, digest_id in items.items():
        digest_items[digest_id].append(event_of[delivery_id])
    by_key = {g["digest_key"]: g for g in digests.values()}
    email_digests = [mail for mail in smtp_server.messages if mail.message["X-Alerts-Digest-Key"]]
    keys = Counter(mail.message["X-Alerts-Digest-Key"] for mail in email_digests)
    assert set(keys) == {g["digest_key"] for g in digests.values() if g["channel"] == "email"}
    assert set(keys.values()) == {1}, "an email digest arrived twice"
    assert len(provider_api.telegram_messages) == sum(1 for g in digests.values() if g["channel"] == "telegram")
    received: dict[tuple[int, str], list[int]] = defaultdict(list)
    for mail in email_digests:
        digest = by_key[mail.message["X-Alerts-Digest-Key"]]
        shown = email_event_ids(mail)
        assert sorted(shown) == sorted(digest_items[digest["id"]])
        assert mail.rcpt_tos == [subscriptions[(digest["user_id"], "email")]]
        received[(digest["user_id"], "email")] += shown
    chat_user = {address: user for (user, channel), address in subscriptions.items() if channel == "telegram"}
    for message in provider_api.telegram_messages:
        assert "more" not in parse_telegram_html(message.text), "each Telegram digest here fits whole"
        received[(chat_user[message.chat_id], "telegram")] += telegram_event_ids(message.text)
    assert set(received) == set(subscriptions)
    for subscription, shown in received.items():
        assert len(shown) == len(set(shown)), f"{subscription} got an event twice"
        assert set(shown) == events, f"{subscription} missed events"
    instant_ids = Counter(mail.message["Message-ID"] for mail in smtp_server.messages
                          if not mail.message["X-Alerts-Digest-Key"])
    assert len(instant_ids) == len(events) and set(instant_ids.values()) == {1}


# --- a phase whose lock is held -------------------------------------------------------------

@pytest.mark.parametrize("held", ["a", "b", "d", "c"])
def test_a_run_reports_a_phase_locked_by_another_run_and_exits_0(pg_url, smtp_server, held):
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        user = add_user(conn, email="locked@example.com")
        add_pref(conn, user, channel="email")
        add_event(conn)  # new: intake, then fan-out to an instant email
    env = runner_env(pg_url, smtp_server)

    with engine.connect() as holder, holder.begin():  # another run, inside phase `held`
        holder.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(held)})
        alone = run_phase(env, held)
        everything = run_phase(env, "all")
    assert alone == {held: {"locked": True}}
    assert everything[held] == {"locked": True}
    assert [name for name, counts in everything.items() if counts.get("locked")] == [held]
    if held == "c":
        assert smtp_server.messages == []
        assert [d["status"] for d in select_all(pg_url, m.user_alert_deliveries)] == ["queued"]

    released = run_phase(env, "all")  # the lock went with the other run's transaction
    assert not any(counts.get("locked") for counts in released.values())
    assert len(smtp_server.messages) == 1
    assert [d["status"] for d in select_all(pg_url, m.user_alert_deliveries)] == ["sent"]
    engine.dispose()
