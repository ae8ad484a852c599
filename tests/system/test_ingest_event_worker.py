"""``alerts.ingest_event`` in a real ``celery worker``: an event it cannot store fails the
task with one ERROR line naming the event_key and the problem, and is not retried."""
from __future__ import annotations

import sqlalchemy as sa

from alerts.core import tables as m
from tests.system.test_celery_worker import (broker_env, broker_url, celery_env, client, redis_only,  # noqa: F401
                                             start_worker, wait_until, worker)

WAIT_SECONDS = 30


def test_an_event_it_cannot_store_fails_the_task_with_one_error_line(worker, client, conn):
    task = client.send_task("alerts.ingest_event", args=[{"event_key": "ttf-bad-1", "alert_type": "price_spike",
                                                          "severity": "high", "title": "TTF +18%"}])

    wait_until(lambda: f"[{task.id}] raised expected" in worker.output(), WAIT_SECONDS, worker.output)
    lines = [line for line in worker.output().splitlines() if "ERROR" in line]
    assert len(lines) == 1, lines
    assert "ttf-bad-1" in lines[0] and "severity: must be a whole number (got string)" in lines[0]
    assert f"[{task.id}] retry" not in worker.output()
    assert conn.execute(sa.select(sa.func.count()).select_from(m.alert_events)).scalar() == 0
