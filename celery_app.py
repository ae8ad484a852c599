"""The Celery application: ``celery -A celery_app worker`` / ``celery -A celery_app beat``.

Configuration comes from the environment through ``Settings`` (alerts/core/settings.py) and is
validated on import: a bad value exits 2 with a message naming the variable, before a
worker or beat starts.

Delivery guarantees do not depend on the broker: tasks are acked late and may run twice;
the row claims in the database make the second run a no-op.
"""
from __future__ import annotations

import sys

from celery import Celery
from kombu import Queue

import beat_schedule
from alerts.core.settings import ConfigError, Settings

PHASE_QUEUE = "alerts"  # phase runs, dispatch, recovery, ingest: short and few
SEND_QUEUE = "alerts.send"  # one task per message: many; its own queue so a backlog
#                             of sends never delays the next intake or digest build


def configuration(settings: Settings) -> dict:
    # Redis redelivers a message not acked within the visibility timeout; Celery and
    # kombu read it from all three places (broker, result backend, the top-level key).
    transport = {"visibility_timeout": settings.celery_visibility_timeout_seconds}
    return dict(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=dict(transport),
        result_backend_transport_options=dict(transport),
        visibility_timeout=settings.celery_visibility_timeout_seconds,
        broker_connection_retry_on_startup=True,
        timezone=settings.timezone,
        enable_utc=True,
        task_default_queue=PHASE_QUEUE,
        task_queues=(Queue(PHASE_QUEUE), Queue(SEND_QUEUE)),
        task_routes={"alerts.send_digest": {"queue": SEND_QUEUE},
                     "alerts.send_delivery": {"queue": SEND_QUEUE}},
        beat_schedule=beat_schedule.build(settings),
    )


try:
    _settings = Settings.from_env()
except ConfigError as exc:
    print(f"configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app = Celery("energyriskiq_alerts", broker=_settings.celery_broker_url, include=["alerts.celery.tasks"])
app.conf.update(configuration(_settings))
