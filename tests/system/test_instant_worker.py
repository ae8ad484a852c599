"""The event-driven instant path with a real ``celery worker`` and no beat (docs/deployment.md):
``alerts.ingest_event`` alone gets an instant email to the SMTP server, once."""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from tests.support.e2e_runner import ROOT, runner_env
from tests.support.factories import add_pref, add_user
from tests.system.test_celery_worker import (broker_env, broker_url, celery_env, client, redis_only,  # noqa: F401
                                      start_worker, wait_until, worker)

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


@pytest.mark.slow
@redis_only  # about runs racing on the rows, not the broker
@pytest.mark.parametrize("loops", [("all",), ("a", "b")], ids=["runner-all", "intake-and-fanout-loops"])
def test_events_ingested_twice_by_two_workers_next_to_looping_runners_are_each_sent_once(
        worker, client, conn, smtp_server, broker_url, broker_env, pg_database, tmp_path, loops):
    """Two workers (2 processes each) take the event-driven path for every event twice
    while runner processes run phases over and over, as cron or beat would: the whole
    pipeline, or Phases A and B each in a loop of its own (then only the workers send).
    Each (reader, event) gets one email, each event one set of deliveries."""
    readers = [add_user(conn, email=f"race{n}@example.com") for n in range(3)]
    for reader in readers:
        add_pref(conn, reader)
    events = [{**EVENT, "event_key": f"race-{n}", "title": f"Race {n}"} for n in range(20)]
    second = start_worker(celery_env(broker_url, pg_database, smtp_server.host, smtp_server.port, **broker_env),
                          tmp_path)
    stop = tmp_path / "stop"
    runners = [subprocess.Popen([sys.executable, "-m", "tests.support.e2e_race", "loop", "--phase", phase,
                                 "--now", datetime.now(timezone.utc).isoformat(), "--stop", str(stop)],
                                env=runner_env(pg_database, smtp_server), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for phase in loops]
    d = m.user_alert_deliveries
    expected = len(readers) * len(events)
    try:
        for event in events + events:
            client.send_task("alerts.ingest_event", args=[event])
        wait_until(lambda: conn.execute(sa.select(sa.func.count()).select_from(d).where(d.c.status == "sent"))
                   .scalar() == expected, 90, worker.output)
    finally:
        stop.touch()
        errors = []
        for runner in runners:
            try:
                errors.append(runner.communicate(timeout=60)[1])
            finally:
                runner.kill()
        second.stop()
    assert [runner.returncode for runner in runners] == [0] * len(runners), errors
    wait_until(lambda: sends_settled(worker.output()), WAIT_SECONDS, worker.output)
    received = Counter((mail.rcpt_tos[0], mail.message["Subject"].rsplit(": ", 1)[1]) for mail in smtp_server.messages)
    assert len(received) == expected and set(received.values()) == {1}
    assert conn.execute(sa.select(sa.func.count()).select_from(d)).scalar() == expected
    assert set(conn.execute(sa.select(m.alert_events.c.status)).scalars()) == {"fanned_out"}
    assert set(conn.execute(sa.select(d.c.attempts)).scalars()) == {1}
