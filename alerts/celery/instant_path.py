"""The event-driven instant path (docs/deployment.md): ``alerts.ingest_event`` stores an event
and, once that is committed, judges it, fans it out and publishes its due instant sends
— seconds, instead of waiting for beat's intake/fan-out tick (30 s) and then its
dispatch tick (15 s). Beat stays the safety net for events stored any other way
(``alerts ingest``, a plain INSERT) and for a task that gave up.

Safe next to beat, cron or a second delivery of the same task, without the phase locks
(a Phase A or B holding its lock for a long backlog must not hold up one event):

- intake judges the event only while it is ``new``, with its row locked
  (``intake_event``), so it and a concurrent Phase A judge it once between them;
- fan-out takes only this event, ``SKIP LOCKED``; when a concurrent Phase B has it, the
  event is still ``ready`` here — that phase's deliveries appear when it commits, so
  the task tries again shortly (``PENDING_RETRY_SECONDS``) to publish them;
- publishing marks rows before it publishes (alerts/sending/dispatch.py): a row beat's
  dispatch marked is not published again, and a send task run twice sends once (only
  one claim wins).

The event's first sends go on the phase queue, which never holds a backlog of sends:
a digest backlog draining through the send queue does not delay an instant alert. A
fan-out larger than ``dispatch.FIRST_CHUNK`` sends the rest through the send queue.
Digest deliveries and deliveries held by quiet hours are not due, so not published.
"""
from __future__ import annotations

import sqlalchemy as sa

from alerts.core import tables as m
from alerts.channels.registry import ChannelSet
from alerts.core.clock import Clock
from alerts.core.settings import Settings
from alerts.core.db import Database
from alerts.phases.fanout import run_phase_b
from alerts.phases.intake import intake_event
from alerts.phases.ingest import MalformedEvent, event_row, ingest_event as store_event

__all__ = ["MalformedEvent", "deliveries_of", "named", "store_and_fan_out"]

PENDING_RETRY_SECONDS = 1  # a concurrent Phase B holds the event: look again this soon
PENDING_RETRIES = 30  # then leave it to beat's dispatch
KEY_SHOWN_CHARS = 80  # of an event_key named in a log line


def store_and_fan_out(db: Database, event: dict, clock: Clock, settings: Settings) -> dict:
    """Store ``event`` (a repeated event_key is a no-op), then judge and fan it out if
    nobody has yet. ``status`` is where the event stands afterwards: ``fanned_out``
    (its deliveries exist), ``rejected``, or ``ready`` (a concurrent Phase B has it)."""
    stored = store_event(db, event)  # raises MalformedEvent when it cannot be stored
    key = event_row(event)["event_key"]
    event_id, status = _event(db, key)
    if status == "new":
        with db.transaction() as conn:
            intake_event(conn, event_id)
    created = 0
    if status in ("new", "ready"):
        created = run_phase_b(db, clock, settings, ChannelSet(), event_id=event_id)["deliveries_created"]
        event_id, status = _event(db, key)
    return {"stored": stored, "event_id": event_id, "status": status, "deliveries_created": created}


def named(event: object) -> str:
    """The event as a log line names it: its event_key, quoted and cut short (producers'
    text, control characters escaped), or that it has none."""
    key = event.get("event_key") if isinstance(event, dict) else None
    if not isinstance(key, str) or not key.strip():
        return "an event without an event_key"
    return f"event {(key if len(key) <= KEY_SHOWN_CHARS else key[:KEY_SHOWN_CHARS] + '…')!r}"


def deliveries_of(event_id: int) -> list[sa.ColumnElement]:
    """The WHERE clause of one event's deliveries (for dispatch.publish_due)."""
    return [m.user_alert_deliveries.c.alert_event_id == event_id]


def _event(db: Database, event_key: str) -> tuple[int, str]:
    e = m.alert_events
    with db.transaction() as conn:
        row = conn.execute(sa.select(e.c.id, e.c.status).where(e.c.event_key == event_key)).one()
    return row.id, row.status
