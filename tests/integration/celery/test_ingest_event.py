"""``alerts.ingest_event`` is never a silent success: an event that breaks a rule but fits
the columns is stored and rejected by intake with a reason; one that cannot be stored at
all fails the task, once (no retry: it is not infrastructure), with one ERROR line naming
the event_key and the problem."""
from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from celery.signals import task_retry

from alerts.core import tables as m
from tests.integration.celery.test_tasks import (app, broker, broker_url, celery_app, clock,  # noqa: F401
                                                 receiving)

EVENT = {"event_key": "ttf-spike-1", "alert_type": "price_spike", "region": "NL", "severity": 4,
         "title": "TTF day-ahead +18%"}


def events(conn) -> list[tuple]:
    e = m.alert_events
    return conn.execute(sa.select(e.c.event_key, e.c.status, e.c.reject_reason).order_by(e.c.id)).all()


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("event, problem", [
    ({k: v for k, v in EVENT.items() if k != "title"}, "missing key 'title'"),
    ({**EVENT, "severity": "high"}, "severity: must be a whole number (got string)"),
    ({**EVENT, "severity": 4.5}, "severity: must be a whole number (got 4.5)"),
    ({**EVENT, "colour": "red"}, "unknown key 'colour'"),
    ({**EVENT, "title": "a\u0000b"}, "title: contains a NUL character"),
])
def test_an_event_that_cannot_be_stored_fails_the_task_once_with_one_error_line(app, conn, caplog, event, problem):
    with receiving(task_retry) as retried, caplog.at_level(logging.INFO):
        result = app.tasks["alerts.ingest_event"].apply((event,))

    assert result.failed() and retried == []
    assert errors(caplog) == [f"alerts.ingest_event: event 'ttf-spike-1' not stored: {problem}"]
    assert any("raised expected" in r.getMessage() for r in caplog.records), "Celery's own line is no error"
    assert events(conn) == []


def test_an_event_without_an_event_key_is_named_as_such(app, conn, caplog):
    with caplog.at_level(logging.INFO):
        result = app.tasks["alerts.ingest_event"].apply(({k: v for k, v in EVENT.items() if k != "event_key"},))

    assert result.failed()
    assert errors(caplog) == ["alerts.ingest_event: an event without an event_key not stored: missing key 'event_key'"]


def test_a_hostile_event_key_is_quoted_and_cut_short_in_the_error_line(app, conn, caplog):
    key = "\x1b[2J" + "k" * 150
    with caplog.at_level(logging.INFO):
        app.tasks["alerts.ingest_event"].apply(({**EVENT, "event_key": key, "severity": None},))

    (line,) = errors(caplog)
    assert "\x1b" not in line and "\\x1b[2J" in line and "k" * 100 not in line


def test_an_event_that_breaks_a_rule_but_fits_the_columns_is_stored_and_rejected(app, conn, caplog):
    bad = {**EVENT, "region": "North\nSea", "created_at": "0001-01-01T00:00:00Z", "severity": 9}
    with caplog.at_level(logging.INFO):
        result = app.tasks["alerts.ingest_event"].apply((bad,)).get()

    assert (result["stored"], result["status"]) == (True, "rejected")
    ((key, status, reason),) = events(conn)
    assert (key, status) == ("ttf-spike-1", "rejected")
    assert [part.split(":")[0] for part in reason.split("; ")] == ["severity", "region", "created_at"]
    assert errors(caplog) == []
