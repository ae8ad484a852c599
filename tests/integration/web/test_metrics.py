"""GET /metrics: what it reads from the database (PostgreSQL and SQLite), the names and
labels Prometheus sees, the bearer token, and what it answers when the database cannot
answer in time."""
from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from alerts.core import tables as m
from alerts.core.db import make_engine
from alerts.operations import check, metrics as ops
from alerts.web import create_app
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_user

KEY = "k" * 16 + "0123456789abcdef"
TOKEN = "s3cr3t-metrics-token/+="
LEASE = 600
UTC = timezone.utc


def scrape_values(body: str) -> dict[tuple, float]:
    """{(metric name, ((label, value), …)): value} of an exposition."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def read(engine, now: datetime) -> dict[tuple, float]:
    with engine.connect() as conn:
        families = ops.read_all(conn, now, LEASE)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def value(values: dict, name: str, **labels) -> float:
    return values[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def client(settings, engine):
    app = create_app(replace(settings, secret_key=KEY), engine=engine)
    return app.test_client()


@pytest.fixture
def guarded(settings, engine):
    app = create_app(replace(settings, secret_key=KEY, metrics_token=TOKEN), engine=engine)
    return app.test_client()


# --- names, labels, values -------------------------------------------------------------------------

def test_every_family_and_label_value_is_exported_zeros_included(client):
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    values = scrape_values(response.get_data(as_text=True))
    names = {name for name, _ in values}
    assert names == {"alerts_rows", "alerts_due_oldest_seconds", "alerts_sending_past_lease",
                     "alerts_blocked_destinations", "alerts_events"}
    rows = {dict(labels)["table"] + "/" + dict(labels)["channel"] for name, labels in values if name == "alerts_rows"}
    assert rows == {"deliveries/email", "deliveries/telegram", "deliveries/sms", "digests/email", "digests/telegram"}
    assert len([1 for name, _ in values if name == "alerts_rows"]) == 5 * 5
    assert {dict(labels)["status"] for name, labels in values if name == "alerts_events"} == set(m.EVENT_STATUSES)
    assert {dict(labels)["channel"] for name, labels in values
            if name == "alerts_blocked_destinations"} == set(m.CHANNELS)
    assert {dict(labels)["table"] for name, labels in values
            if name in ("alerts_due_oldest_seconds", "alerts_sending_past_lease")} == {"deliveries", "digests"}
    assert set(values.values()) == {0.0}


def test_rows_count_instant_deliveries_and_digests_by_channel_and_status(engine, now):
    with engine.begin() as conn:
        user = add_user(conn, telegram_chat_id="42")
        for status, channel in [("sent", "email"), ("sent", "email"), ("failed", "email"), ("queued", "telegram"),
                                ("skipped", "sms")]:
            add_delivery(conn, user, add_event(conn, status="fanned_out"), channel=channel, status=status)
        add_digest(conn, user, events=3)  # its three digest deliveries are not instant deliveries
        add_digest(conn, user, events=1, channel="telegram", status="sent", digest_key="t")

    values = read(engine, now)

    assert value(values, "alerts_rows", table="deliveries", channel="email", status="sent") == 2
    assert value(values, "alerts_rows", table="deliveries", channel="email", status="failed") == 1
    assert value(values, "alerts_rows", table="deliveries", channel="telegram", status="queued") == 1
    assert value(values, "alerts_rows", table="deliveries", channel="sms", status="skipped") == 1
    assert value(values, "alerts_rows", table="deliveries", channel="email", status="skipped") == 0, \
        "digest deliveries batched into a digest are not counted"
    assert value(values, "alerts_rows", table="digests", channel="email", status="queued") == 1
    assert value(values, "alerts_rows", table="digests", channel="telegram", status="sent") == 1
    assert value(values, "alerts_events", status="fanned_out") == 9


def test_the_oldest_due_age_counts_as_alerts_check_does(engine, now):
    with engine.begin() as conn:
        user = add_user(conn)
        event = add_event(conn, status="fanned_out")
        # due since it was created, 20 minutes ago
        add_delivery(conn, user, event, created_at=now - timedelta(minutes=20))
        # created an hour ago, due again only since its retry time 5 minutes ago
        add_delivery(conn, user, event, channel="telegram", created_at=now - timedelta(hours=1),
                     next_retry_at=now - timedelta(minutes=5), attempts=1, last_error="smtp 451")
        # held by quiet hours: not due yet, however old
        add_delivery(conn, user, event, channel="sms", created_at=now - timedelta(hours=3),
                     next_retry_at=now + timedelta(hours=2))
        add_digest(conn, user, next_retry_at=now - timedelta(minutes=7))  # its window closed 7 minutes ago

    values = read(engine, now)

    assert value(values, "alerts_due_oldest_seconds", table="deliveries") == 20 * 60
    assert value(values, "alerts_due_oldest_seconds", table="digests") == 7 * 60
    problems = {p["kind"]: p for p in check.find_problems(engine, now, 60, LEASE)}
    assert problems["instant"]["oldest_seconds"] == 20 * 60
    assert problems["digests"]["oldest_seconds"] == 7 * 60


def test_nothing_due_reads_zero_also_with_rows_waiting_for_later(engine, now):
    with engine.begin() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), next_retry_at=now + timedelta(minutes=1))
        add_digest(conn, user)  # due at WINDOW_END, after now
    assert now < WINDOW_END
    values = read(engine, now)
    assert value(values, "alerts_due_oldest_seconds", table="deliveries") == 0
    assert value(values, "alerts_due_oldest_seconds", table="digests") == 0


def test_sends_past_the_lease_are_counted_and_a_fresh_claim_is_not(engine, now):
    with engine.begin() as conn:
        user = add_user(conn)
        event = add_event(conn, status="fanned_out")
        add_delivery(conn, user, event, status="sending", attempts=1, claimed_at=now - timedelta(seconds=LEASE + 1))
        add_delivery(conn, user, event, channel="telegram", status="sending", attempts=1,
                     claimed_at=now - timedelta(seconds=30))
        add_digest(conn, user, status="sending", attempts=1, claimed_at=now - timedelta(hours=2))

    values = read(engine, now)

    assert value(values, "alerts_sending_past_lease", table="deliveries") == 1
    assert value(values, "alerts_sending_past_lease", table="digests") == 1


def test_blocked_destinations_are_the_rows_of_user_channel_blocks_by_channel(engine, now):
    with engine.begin() as conn:
        for channel in ("email", "email", "telegram"):
            user = add_user(conn)
            conn.execute(sa.insert(m.user_channel_blocks).values(
                user_id=user, channel=channel, address="gone@example.com", reason="smtp 550 5.1.1 gone@example.com"))
    values = read(engine, now)
    assert [value(values, "alerts_blocked_destinations", channel=c) for c in m.CHANNELS] == [2, 1, 0]


def test_the_scrape_names_no_address_id_or_reason(client, engine):
    with engine.begin() as conn:
        user = add_user(conn, email="jane.doe@example.com")
        add_delivery(conn, user, add_event(conn, event_key="secret-event-key"), status="failed",
                     last_error="smtp 550 jane.doe@example.com unknown")
        conn.execute(sa.insert(m.user_channel_blocks).values(user_id=user, channel="email",
                                                             address="jane.doe@example.com", reason="smtp 550"))
    body = client.get("/metrics").get_data(as_text=True)
    assert "jane.doe" not in body and "secret-event-key" not in body and "smtp" not in body


def test_prometheus_may_ask_for_openmetrics(client):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.get_data(as_text=True).endswith("# EOF\n")


# --- the bearer token ------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                                    f"Basic {TOKEN}", TOKEN, f"Token {TOKEN}", "Bearer wrong"])
def test_without_the_right_bearer_token_it_is_401_and_says_bearer(guarded, header):
    response = guarded.get("/metrics", headers={"Authorization": header} if header is not None else {})

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "alerts_" not in response.get_data(as_text=True)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_matched_in_any_case(guarded, scheme):
    response = guarded.get("/metrics", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200
    assert "alerts_rows" in response.get_data(as_text=True)


def test_without_a_token_configured_no_authorization_is_asked(client):
    assert client.get("/metrics").status_code == 200


def test_the_token_is_a_setting_that_is_never_shown(settings):
    from alerts.core.settings import ConfigError, Settings

    assert Settings.from_env({"ALERTS_METRICS_TOKEN": TOKEN}).metrics_token == TOKEN
    assert TOKEN not in repr(Settings.from_env({"ALERTS_METRICS_TOKEN": TOKEN}))
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"ALERTS_METRICS_TOKEN": "two words"})
    assert err.value.variable == "ALERTS_METRICS_TOKEN" and "two words" not in str(err.value)


# --- when the database cannot answer -------------------------------------------------------------------

def test_an_unreachable_database_is_a_503_not_stale_numbers(settings):
    app = create_app(replace(settings, secret_key=KEY, database_url="postgresql://nobody@127.0.0.1:1/none"))
    response = app.test_client().get("/metrics")
    assert (response.status_code, response.get_data(as_text=True)) == (503, "database unavailable\n")


def test_a_scrape_stuck_behind_a_lock_fails_fast_with_503(pg_url, monkeypatch):
    """A table locked by a long migration: the scrape gives up at its statement timeout."""
    from alerts.core.settings import Settings

    monkeypatch.setattr(ops, "SCRAPE_STATEMENT_TIMEOUT_MS", 300)
    engine = make_engine(pg_url)
    app = create_app(replace(Settings.from_env({"DATABASE_URL": pg_url}), secret_key=KEY), engine=engine)
    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        with engine.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE user_channel_blocks IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        started = datetime.now(UTC)
        response = app.test_client().get("/metrics")
        waited = (datetime.now(UTC) - started).total_seconds()
    finally:
        release.set()
        holder.join(30)
        engine.dispose()
    assert response.status_code == 503
    assert waited < 5
