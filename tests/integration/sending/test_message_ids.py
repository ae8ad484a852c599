"""Message-IDs are unique per installation: ``<…@domain>`` with the domain of
ALERTS_EMAIL_FROM and the identifier the first ``alerts migrate`` made, selected by the
outbox's load (one more column, no extra query), the same on every retry."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.db import make_engine, migrate
from alerts.core.settings import Settings
from alerts.phases.pipeline import run_phases, session
from tests.support.clock import clock_at
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_user
from tests.support.fakes.fixtures import with_fakes

NOW = datetime(2026, 5, 13, 9, tzinfo=timezone.utc)
FROM = "EnergyRiskIQ Alerts <alerts@mail.energyriskiq.example>"


def settings_for(url: str, smtp_server) -> Settings:
    return with_fakes(Settings.from_env({"DATABASE_URL": url, "ALERTS_EMAIL_FROM": FROM}), smtp_server)


def run_c(url: str, settings: Settings, now: datetime) -> dict:
    engine = make_engine(url)
    try:
        with session(engine, settings) as (db, channels):
            return run_phases(db, ("c",), clock_at(now), settings, channels)["c"]
    finally:
        engine.dispose()


def seed(url: str) -> tuple[int, int, str]:
    """One instant delivery and one due digest; their ids, and the installation's identifier."""
    engine = make_engine(url)
    with engine.begin() as conn:
        user = add_user(conn, email="reader@example.com")
        delivery = add_delivery(conn, user, add_event(conn, status="fanned_out"))
        digest = add_digest(conn, user, next_retry_at=WINDOW_END)
        installation = conn.execute(sa.select(m.installation.c.installation_id)).scalar_one()
    engine.dispose()
    return delivery, digest, installation


def test_two_databases_migrated_apart_give_the_same_delivery_different_message_ids(pg_url, tmp_path, smtp_server):
    other_url = f"sqlite:///{tmp_path / 'staging.db'}"
    migrate(other_url)
    ids = {}
    for url in (pg_url, other_url):
        delivery, digest, installation = seed(url)
        assert run_c(url, settings_for(url, smtp_server), NOW)["digests"]["sent"] == 1
        instant_mail, digest_mail = smtp_server.messages[-2:]
        ids[url] = (delivery, digest, installation, instant_mail.message["Message-ID"],
                    digest_mail.message["Message-ID"])

    (d1, g1, inst1, instant1, digest1), (d2, g2, inst2, instant2, digest2) = ids.values()
    assert (d1, g1) == (d2, g2), "the same row ids in both databases"
    assert inst1 != inst2
    assert instant1 == f"<alert-delivery-{d1}.{inst1}@mail.energyriskiq.example>"
    assert instant2 == f"<alert-delivery-{d2}.{inst2}@mail.energyriskiq.example>"
    assert digest1 != digest2
    assert digest1.endswith(f".{inst1}@mail.energyriskiq.example>") and digest1.startswith("<digest-")
    assert digest2.endswith(f".{inst2}@mail.energyriskiq.example>")


def test_a_retry_keeps_its_message_id(pg_url, smtp_server):
    delivery, _, installation = seed(pg_url)
    settings = settings_for(pg_url, smtp_server)
    smtp_server.drop_after_data(times=2)  # taken, but the sender never hears so: transient

    first = run_c(pg_url, settings, NOW)
    second = run_c(pg_url, replace(settings), NOW + timedelta(hours=2))

    assert first["instant"]["retried"] == first["digests"]["retried"] == 1
    assert second["instant"]["sent"] == second["digests"]["sent"] == 1
    by_id: dict[str, int] = {}
    for mail in smtp_server.messages:
        by_id[mail.message["Message-ID"]] = by_id.get(mail.message["Message-ID"], 0) + 1
    assert sorted(by_id.values()) == [2, 2], "each row's two copies carry one Message-ID: a receiver drops one"
    assert f"<alert-delivery-{delivery}.{installation}@mail.energyriskiq.example>" in by_id
