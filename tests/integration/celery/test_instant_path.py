"""The event-driven instant path (docs/deployment.md): ``alerts.ingest_event`` judges, fans out and
publishes its event's due instant sends itself, without a beat tick.

Tasks run with ``task.apply()`` on PostgreSQL; the tasks they publish really go to Redis
and ``drain`` plays the worker (see tests/integration/celery/test_tasks.py).
"""
from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from celery.signals import task_retry

from alerts.sending import dispatch
from alerts.celery import instant_path
from alerts.core import tables as m
from alerts.core.db import lock_key, make_engine
from tests.support.factories import add_pref, add_user
from tests.integration.celery.test_tasks import (PHASE_QUEUE, SEND_QUEUE, app, broker, broker_url, celery_app, clock,  # noqa: F401
                              drain, published, receiving)

EVENT = {"event_key": "ttf-spike-1", "alert_type": "price_spike", "region": "NL", "severity": 4,
         "title": "TTF day-ahead +18%", "summary": "Cold snap", "url": "https://energyriskiq.com/e/1"}


def ingest(app, event=EVENT) -> dict:
    return app.tasks["alerts.ingest_event"].apply((event,)).get()


def deliveries(conn) -> list[tuple]:
    d = m.user_alert_deliveries
    return conn.execute(sa.select(d.c.user_id, d.c.delivery_kind, d.c.status).order_by(d.c.id)).all()


def event_status(conn) -> str:
    return conn.execute(sa.select(m.alert_events.c.status)).scalar_one()


def test_an_ingested_event_is_fanned_out_and_its_sends_published_on_the_phase_queue(app, conn, broker,
                                                                                      smtp_server):
    reader = add_user(conn, email="reader@example.com")
    add_pref(conn, reader)

    result = ingest(app)

    assert result == {"stored": True, "event_id": result["event_id"], "status": "fanned_out",
                      "deliveries_created": 1, "enqueued": 1}
    (delivery_id,) = conn.execute(sa.select(m.user_alert_deliveries.c.id)).scalars()
    assert [(msg["task"], msg["args"]) for msg in published(broker, PHASE_QUEUE)] == [
        ("alerts.send_delivery", [delivery_id])]
    assert published(broker, SEND_QUEUE) == [], "not behind a backlog of sends"
    assert drain(app, broker, PHASE_QUEUE) == ["sent"]
    assert [mail.rcpt_tos for mail in smtp_server.messages] == [["reader@example.com"]]


def test_an_event_delivered_twice_is_sent_once(app, conn, broker, smtp_server):
    add_pref(conn, add_user(conn, email="reader@example.com"))

    first, second = ingest(app), ingest(app)

    assert (first["enqueued"], second["stored"], second["deliveries_created"], second["enqueued"]) == (1, False, 0, 0)
    assert drain(app, broker, PHASE_QUEUE) == ["sent"]
    assert len(smtp_server.messages) == 1


def test_a_send_published_twice_still_sends_once(app, conn, broker, smtp_server):
    add_pref(conn, add_user(conn, email="reader@example.com"))
    ingest(app)
    conn.execute(sa.update(m.user_alert_deliveries).values(enqueued_at=None))  # as if the mark were lost
    assert ingest(app)["enqueued"] == 1

    assert sorted(drain(app, broker, PHASE_QUEUE), key=str) == [None, "sent"]
    assert len(smtp_server.messages) == 1


def test_a_rejected_event_publishes_nothing(app, conn, broker):
    add_pref(conn, add_user(conn))

    result = ingest(app, {**EVENT, "url": "javascript:alert(1)"})

    assert (result["status"], result["enqueued"]) == ("rejected", 0)
    assert deliveries(conn) == [] and published(broker, PHASE_QUEUE) == []


def test_digest_deliveries_wait_for_their_digest(app, conn, broker):
    user = add_user(conn)
    add_pref(conn, user, delivery_kind="digest")

    result = ingest(app)

    assert (result["deliveries_created"], result["enqueued"]) == (1, 0)
    assert deliveries(conn) == [(user, "digest", "queued")]
    assert published(broker, PHASE_QUEUE) == [] and published(broker, SEND_QUEUE) == []


def test_beat_holding_the_phase_locks_does_not_hold_up_an_event(app, conn, broker, pg_url):
    """A long Phase A or B of beat (a big backlog) holds its advisory lock: the event goes
    through anyway — its own row is all it needs."""
    add_pref(conn, add_user(conn))
    engine = make_engine(pg_url)
    try:
        with engine.connect() as holder, holder.begin():
            for phase in "abdc":
                assert holder.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"),
                                      {"k": lock_key(phase)}).scalar()
            result = ingest(app)
    finally:
        engine.dispose()
    assert (result["status"], result["enqueued"]) == ("fanned_out", 1)


def test_an_event_a_concurrent_fan_out_holds_is_tried_again_then_left_to_beat(app, conn, broker, pg_url):
    """Phase B elsewhere has the event (row locked): its deliveries appear when it commits,
    so the task tries again shortly, a bounded number of times."""
    add_pref(conn, add_user(conn))
    app.tasks["alerts.intake"].apply().get()  # nothing yet
    conn.execute(sa.insert(m.alert_events).values(**EVENT, status="ready"))
    engine = make_engine(pg_url)
    try:
        with engine.connect() as holder, holder.begin():
            holder.execute(sa.select(m.alert_events.c.id).with_for_update())
            with receiving(task_retry) as retried:
                result = ingest(app)
    finally:
        engine.dispose()

    assert len(retried) == instant_path.PENDING_RETRIES
    assert (result["status"], result["enqueued"]) == ("ready", 0)
    assert ingest(app)["enqueued"] == 1, "once the lock is gone the event goes through"


def test_a_large_fan_out_sends_its_first_chunk_on_the_phase_queue_and_the_rest_as_usual(app, conn, broker,
                                                                                        monkeypatch):
    monkeypatch.setattr(dispatch, "FIRST_CHUNK", 2)
    for _ in range(5):
        add_pref(conn, add_user(conn))

    assert ingest(app)["enqueued"] == 5

    assert len(published(broker, PHASE_QUEUE)) == 2
    assert len(published(broker, SEND_QUEUE)) == 3


@pytest.mark.parametrize("status", ["new", "ready", "fanned_out"])
def test_an_event_stored_otherwise_is_picked_up_where_it_stands(app, conn, broker, status):
    """An `alerts ingest` or INSERT stored it first (and beat may have judged or fanned it out)."""
    add_pref(conn, add_user(conn))
    conn.execute(sa.insert(m.alert_events).values(**EVENT, status=status))

    result = ingest(app)

    assert result["stored"] is False
    assert result["status"] == "fanned_out"
    assert result["enqueued"] == (0 if status == "fanned_out" else 1)


def test_an_event_phase_a_is_judging_elsewhere_is_judged_once_and_then_fanned_out(app, conn, broker, pg_url):
    """Phase A elsewhere has locked the new event to judge it: the task waits for that
    verdict instead of judging the event a second time, then fans it out."""
    add_pref(conn, add_user(conn))
    conn.execute(sa.insert(m.alert_events).values(**EVENT))
    e = m.alert_events
    engine = make_engine(pg_url)
    result: dict = {}
    task = threading.Thread(target=lambda: result.update(ingest(app)))
    try:
        with engine.connect() as phase_a, phase_a.begin():
            phase_a.execute(sa.select(e.c.id).where(e.c.status == "new").with_for_update())
            task.start()
            task.join(1.0)
            assert task.is_alive(), "the task waits for the row"
            phase_a.execute(sa.update(e).values(status="ready", title="judged by phase A"))
        task.join(30)
    finally:
        engine.dispose()
    assert not task.is_alive()
    assert (result["status"], result["enqueued"]) == ("fanned_out", 1)
    assert conn.execute(sa.select(e.c.title)).scalar_one() == "judged by phase A"
