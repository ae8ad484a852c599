"""The event-driven instant path with a real ``celery worker`` and no beat (SPEC §12.1):
``alerts.ingest_event`` alone gets an instant email to the SMTP server, once."""
from __future__ import annotations

import re

import sqlalchemy as sa

from alerts import models as m
from tests.factories import add_pref, add_user
from tests.test_celery_worker import (broker, broker_url, client, conn, purge, wait_until,  # noqa: F401
                                      worker)

EVENT = {"event_key": "ttf-spike-worker", "alert_type": "price_spike", "region": "NL", "severity": 4,
         "title": "TTF day-ahead +18%", "summary": "Cold snap", "url": "https://energyriskiq.com/e/1"}
WAIT_SECONDS = 30


def sends_settled(log: str) -> bool:
    """Every alerts.send_delivery the worker received has finished."""
    received = set(re.findall(r"Task alerts\.send_delivery\[([\w-]+)\] received", log))
    finished = set(re.findall(r"Task alerts\.send_delivery\[([\w-]+)\] succeeded", log))
    return bool(received) and received <= finished


def test_ingest_event_alone_delivers_an_instant_email_without_beat(worker, client, conn, smtp_server):
    add_pref(conn, add_user(conn, email="reader@example.com"))

    task = client.send_task("alerts.ingest_event", args=[EVENT])

    wait_until(lambda: len(smtp_server.messages) >= 1, WAIT_SECONDS, worker.output)
    assert smtp_server.messages[0].rcpt_tos == ["reader@example.com"]
    assert smtp_server.messages[0].message["Subject"].endswith("TTF day-ahead +18%")
    wait_until(lambda: f"[{task.id}] succeeded" in worker.output(), WAIT_SECONDS, worker.output)
    d = m.user_alert_deliveries
    assert conn.execute(sa.select(d.c.status, d.c.attempts)).all() == [("sent", 1)]


def test_ingest_event_delivered_twice_sends_one_message(worker, client, conn, smtp_server):
    add_pref(conn, add_user(conn, email="reader@example.com"))

    tasks = [client.send_task("alerts.ingest_event", args=[EVENT]) for _ in range(2)]

    wait_until(lambda: all(f"[{task.id}] succeeded" in worker.output() for task in tasks), WAIT_SECONDS,
               worker.output)
    d = m.user_alert_deliveries
    wait_until(lambda: conn.execute(sa.select(d.c.status)).scalars().all() == ["sent"], WAIT_SECONDS, worker.output)
    wait_until(lambda: sends_settled(worker.output()), WAIT_SECONDS, worker.output)  # no send still to come
    assert len(smtp_server.messages) == 1
    assert conn.execute(sa.select(sa.func.count()).select_from(m.alert_events)).scalar() == 1
