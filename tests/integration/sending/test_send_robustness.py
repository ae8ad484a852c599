"""Phase C under trouble found by the soak (tests/system/soak/soak.py):

- a send whose database connection drops while the message is on its way still records
  its outcome (pg_terminate_backend or a short outage during a send produced duplicates:
  the row stayed in ``sending`` and was sent again after the lease);
- a batch whose sends outlast the lease never has its claims recovered — and sent again —
  by another process (a runner with slow SMTP produced duplicates);
- claims, ``sent_at`` and backoff carry the time they happen, not the run's start.

Time is a ManualClock that the fake channels advance: nothing here sleeps to pass time."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from alerts.core import tables as m
from alerts.channels import Channel, DeliveryError
from alerts.channels.registry import ChannelSet
from alerts.core.settings import Settings
from alerts.core.db import Database, make_engine
from alerts.sending.outbox import INSTANT
from alerts.phases.send import run_phase_c, send_due
from alerts.sending.service import recover_stale, send_one
from tests.support.clock import ManualClock, clock_at
from tests.conftest import PG_ADMIN_URL
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_user

NOW = datetime(2026, 5, 13, 12, 0, tzinfo=timezone.utc)


class DropsTheDatabase(Channel):
    """Accepts every message and, while doing so, drops every connection to the test
    database — as a PostgreSQL restart or failover would — optionally refusing new ones
    for ``outage`` seconds."""

    name = "email"

    def __init__(self, database: str, outage: float = 0.0):
        self.database, self.outage, self.sent, self.timers = database, outage, [], []
        self.admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def _sql(self, statement: str, *params) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(statement, params)

    def send(self, recipient, message) -> None:
        if self.outage:
            self._sql(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS false')
            timer = threading.Timer(self.outage, self._sql,
                                    (f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS true',))
            timer.start()
            self.timers.append(timer)
        self._sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                  "AND pid <> pg_backend_pid()", self.database)
        self.sent.append(recipient)

    def close(self) -> None:
        for timer in self.timers:  # the database accepts connections again before the next test
            timer.join()
        self.admin.dispose()


def seed(engine, n: int = 1) -> list[int]:
    with engine.begin() as conn:
        user = add_user(conn)
        return [add_delivery(conn, user, add_event(conn)) for _ in range(n)]


def state(url: str, delivery_id: int) -> tuple:
    fresh = make_engine(url)  # another connection: sees only what was committed
    with fresh.connect() as conn:
        found = conn.execute(sa.select(m.user_alert_deliveries.c.status, m.user_alert_deliveries.c.attempts)
                             .where(m.user_alert_deliveries.c.id == delivery_id)).one()
    fresh.dispose()
    return tuple(found)


def send_while_the_database_drops(pg_url, outage: float = 0.0) -> tuple[str | None, DropsTheDatabase, int]:
    """``send_one`` of one instant delivery through a channel that drops every database
    connection as it sends (then refuses new ones for ``outage`` seconds)."""
    engine = make_engine(pg_url)
    (delivery,) = seed(engine)
    channel = DropsTheDatabase(engine.url.database, outage=outage)
    try:
        status = send_one(Database(engine), INSTANT, delivery, clock_at(NOW), Settings(),
                          ChannelSet({"email": channel})).status
    finally:
        channel.close()
        engine.dispose()
    return status, channel, delivery


def test_the_outcome_is_recorded_when_the_connection_drops_during_the_send(pg_url):
    status, channel, delivery = send_while_the_database_drops(pg_url)
    assert status == "sent"
    assert len(channel.sent) == 1
    assert state(pg_url, delivery) == ("sent", 1)


def test_the_outcome_is_recorded_after_a_short_database_outage(pg_url):
    status, _, delivery = send_while_the_database_drops(pg_url, outage=1.0)
    assert status == "sent"
    assert state(pg_url, delivery) == ("sent", 1)


def test_a_batch_goes_on_after_the_connection_drops(pg_url):
    engine = make_engine(pg_url)
    deliveries = seed(engine, 3)
    channel = DropsTheDatabase(engine.url.database)
    try:
        counts = send_due(Database(engine), INSTANT, clock_at(NOW), Settings(), ChannelSet({"email": channel}))
    finally:
        channel.close()
        engine.dispose()
    assert counts.sent == 3 and len(channel.sent) == 3
    assert [state(pg_url, d) for d in deliveries] == [("sent", 1)] * 3


class SlowChannel(Channel):
    """Accepts every message after ``seconds`` of the run's clock, like a provider with
    slow DATA; ``during`` runs while it "waits" (another process's lease recovery)."""

    name = "email"

    def __init__(self, clock: ManualClock, seconds: float, during=lambda: None):
        self.clock, self.seconds, self.during, self.sent = clock, seconds, during, []

    def send(self, recipient, message) -> None:
        self.clock.advance(self.seconds)
        self.during()
        self.sent.append(message.message_id)


def test_a_batch_that_outlasts_the_lease_is_never_recovered_and_sent_twice(pg_url):
    """Another process recovers stale claims, on the same clock, after every send."""
    engine = make_engine(pg_url)
    deliveries = seed(engine, 8)
    settings = replace(Settings(), sending_lease_seconds=2, send_batch_size=100, email_backend="smtp",
                       smtp_host="127.0.0.1")
    clock, recovered = clock_at(NOW), []
    channel = SlowChannel(clock, 0.6, lambda: recovered.append(recover_stale(Database(engine), clock, settings)))
    try:
        counts = send_due(Database(engine), INSTANT, clock, settings, ChannelSet({"email": channel}))
    finally:
        engine.dispose()
    assert counts.sent == 8 and clock.elapsed() > 2 * settings.sending_lease_seconds
    assert sorted(Counter(channel.sent).values()) == [1] * 8
    assert len(recovered) == 8 and not any(any(r.values()) for r in recovered), "no claim of ours was taken"
    assert [state(pg_url, d) for d in deliveries] == [("sent", 1)] * 8


def claimed_at(engine, table, row_id):
    with engine.connect() as other:
        return other.execute(sa.select(table.c.claimed_at).where(table.c.id == row_id)).scalar_one()


def test_claims_made_late_in_a_long_run_carry_the_time_they_were_made(pg_url, monkeypatch):
    """A runner whose earlier phases took minutes must not stamp its claims with the
    time it started: another process's lease recovery, on its own clock, would take
    them for abandoned and send them again (found by the soak)."""
    from alerts.phases import pipeline

    engine = make_engine(pg_url)
    (delivery,) = seed(engine)
    clock, seen = clock_at(NOW), []

    class Peek(Channel):
        name = "email"

        def send(self, recipient, message) -> None:
            seen.append(claimed_at(engine, m.user_alert_deliveries, delivery))

    monkeypatch.setitem(pipeline.PHASES, "a", lambda *args: clock.advance(200) and {})
    settings = replace(Settings(), email_backend="smtp", smtp_host="127.0.0.1")
    try:
        results = pipeline.run_phases(Database(engine), ("a", "c"), clock, settings, ChannelSet({"email": Peek()}))
    finally:
        engine.dispose()
    assert results["c"]["instant"]["sent"] == 1
    assert seen == [NOW + timedelta(seconds=200)]


def test_digest_claims_after_a_long_instant_pass_carry_the_time_they_were_made(pg_url):
    """Phase C sends instant deliveries, then digests: a digest claimed after minutes of
    instant sends must not be stamped with the phase's start, or workers' lease recovery
    takes it for abandoned and it is sent twice (found by the soak: 1,800 duplicates)."""
    engine = make_engine(pg_url)
    seed(engine)
    with engine.begin() as conn:
        digest = add_digest(conn, add_user(conn, email="digest@example.com"))
    start = WINDOW_END + timedelta(minutes=5)
    clock, seen = clock_at(start), []

    class SlowInstantPeekDigest(Channel):
        name = "email"

        def send(self, recipient, message) -> None:
            if recipient != "digest@example.com":
                clock.advance(700)  # the instant pass takes longer than the lease
                return
            seen.append(claimed_at(engine, m.user_alert_digests, digest))

    settings = replace(Settings(), email_backend="smtp", smtp_host="127.0.0.1")
    try:
        results = run_phase_c(Database(engine), clock, settings, ChannelSet({"email": SlowInstantPeekDigest()}))
    finally:
        engine.dispose()
    assert results["instant"]["sent"] == 1 and results["digests"]["sent"] == 1
    assert seen == [start + timedelta(seconds=700)]


def test_sent_at_and_next_retry_at_are_the_time_of_their_own_send(pg_url):
    engine = make_engine(pg_url)
    first, second = seed(engine, 2)
    settings = replace(Settings(), email_backend="smtp", smtp_host="127.0.0.1", retry_base_seconds=60)
    clock = clock_at(NOW)

    class SlowThenSent(Channel):
        name = "email"
        calls = 0

        def send(self, recipient, message) -> None:
            clock.advance(30)
            self.calls += 1
            if self.calls == 2:
                raise DeliveryError("smtp 451 4.3.0 try later")

    try:
        send_due(Database(engine), INSTANT, clock, settings, ChannelSet({"email": SlowThenSent()}))
        with engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(sa.select(m.user_alert_deliveries))}
    finally:
        engine.dispose()
    assert rows[first].sent_at == NOW + timedelta(seconds=30)
    # equal jitter: half the step fixed, from the time of the failed send (NOW + 60 s)
    retry_from = NOW + timedelta(seconds=60)
    assert retry_from + timedelta(seconds=30) <= rows[second].next_retry_at <= retry_from + timedelta(seconds=60)
