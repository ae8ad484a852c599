"""One-click unsubscribe racing real sender processes (docs/web-and-security.md): every row is either
sent before the POST's 200 or skipped `unsubscribed` — never sent after the 200, never
sent twice, never lost.

Two sender processes work through the queue (the runner's Phase C, claiming a few rows
at a time, and one send per row as the Celery send tasks do) against an SMTP server that
takes 40 ms per message, while the test unsubscribes the users one after the other —
half of them at a moment one of their rows is in flight (``sending``), so the POST has
to wait for that send's outcome before it may answer."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core import tokens
from alerts.subscribers import unsubscribe as unsub
from alerts.core.db import make_engine
from alerts.web import create_app
from tests.support.e2e_runner import ROOT, RUN_TIMEOUT_SECONDS, runner_env
from tests.support.factories import add_delivery, add_digest, add_event, add_pref, add_user
from tests.integration.web.test_app import KEY, ONE_CLICK

NOW = "2026-05-13T00:00:00+00:00"
USERS = 8
ROWS_PER_USER = 6
ROUNDS = 2
SEND_SECONDS = 0.04
WAIT_SECONDS = 20  # for a user's row to be in flight, or for the senders to finish


def seed(engine) -> list[int]:
    """Users with an email preference, their instant deliveries interleaved by id (so each
    user's rows spread over the whole queue) and one due digest each."""
    with engine.begin() as conn:
        users = [add_user(conn, email=f"racer{n}@example.com") for n in range(USERS)]
        for user in users:
            add_pref(conn, user, channel="email")
            add_digest(conn, user, events=1, digest_key=f"race:{user}")
        for _ in range(ROWS_PER_USER):
            for user in users:
                add_delivery(conn, user, add_event(conn, status="fanned_out"))
    return users


def wait_until_in_flight(engine, user: int) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if unsub.in_flight(conn, user, "email"):
                return True
        time.sleep(0.002)
    return False


def sent_rows(engine) -> dict[tuple[str, int], int]:
    """(table, row id) -> user id for every row recorded as sent."""
    out = {}
    with engine.connect() as conn:
        for table in (m.user_alert_deliveries, m.user_alert_digests):
            query = sa.select(table.c.id, table.c.user_id, table.c.status, table.c.last_error)
            if table is m.user_alert_deliveries:  # not the digests' items: those are batched
                query = query.where(table.c.delivery_kind == m.INSTANT)
            for row in conn.execute(query):
                assert (row.status, row.last_error) in (("sent", None), ("skipped", "unsubscribed")), row
                if row.status == "sent":
                    out[(table.name, row.id)] = row.user_id
    return out


# <alert-delivery-ID.INSTALLATION@domain>
DELIVERY_ID = re.compile(r"<alert-delivery-(\d+)\.")


def received_rows(engine, mails) -> dict[tuple[str, int], float]:
    """(table, row id) -> arrival time of each message received; fails on a duplicate."""
    with engine.connect() as conn:
        digest_of_key = {key: row_id for key, row_id in conn.execute(
            sa.select(m.user_alert_digests.c.digest_key, m.user_alert_digests.c.id))}
    out = {}
    for mail in mails:
        message = mail.message
        if message["X-Alerts-Digest-Key"]:
            key = ("user_alert_digests", digest_of_key[message["X-Alerts-Digest-Key"]])
        else:
            key = ("user_alert_deliveries", int(DELIVERY_ID.search(message["Message-ID"]).group(1)))
        assert key not in out, f"{key} sent twice"
        out[key] = mail.received_at
    return out


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_row_is_sent_before_the_200_or_skipped_never_after(pg_url, smtp_server, tmp_path, round_):
    engine = make_engine(pg_url)
    users = seed(engine)
    smtp_server.data_delay = SEND_SECONDS
    client = create_app(_settings(pg_url), engine=engine).test_client()
    env = runner_env(pg_url, smtp_server, ALERTS_SEND_BATCH_SIZE="3")
    stop = tmp_path / "stop"
    senders = [subprocess.Popen([sys.executable, "-m", "tests.support.e2e_race", "loop", "--phase", phase, "--now", NOW,
                                 "--stop", str(stop)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for phase in ("c", "tasks")]
    answered: dict[int, float] = {}
    waited_for_a_send = 0
    try:
        for n, user in enumerate(users):
            if n % 2 == 0:
                waited_for_a_send += wait_until_in_flight(engine, user)
            else:
                time.sleep(SEND_SECONDS * 2)
            response = client.post(f"/unsubscribe/{tokens.make_token(KEY, user, 'email')}", data=ONE_CLICK)
            answered[user] = time.time()
            assert response.status_code == 200
    finally:
        stop.touch()
        errors = [proc.communicate(timeout=RUN_TIMEOUT_SECONDS)[1] for proc in senders]
    assert [proc.returncode for proc in senders] == [0, 0], errors
    try:
        sent = sent_rows(engine)
        received = received_rows(engine, smtp_server.messages)
    finally:
        engine.dispose()
    assert set(sent) == set(received), "every row recorded sent arrived, and nothing else did"
    for row, user in sent.items():
        assert received[row] < answered[user], f"{row} of user {user} arrived after its unsubscribe's 200"
    total = USERS * (ROWS_PER_USER + 1)
    assert 0 < len(sent) < total, "the race happened: some rows went out before their unsubscribe, some did not"
    assert waited_for_a_send >= USERS // 2 - 1, "unsubscribes arrived while a send of theirs was in flight"


def _settings(pg_url):
    from alerts.core.settings import Settings

    return Settings.from_env({"DATABASE_URL": pg_url, "ALERTS_SECRET_KEY": KEY})
