"""The Celery application: ``celery -A celery_app worker`` / ``celery -A celery_app beat``.

Configuration comes from the environment and is validated on import: a bad value exits 2
with a message naming the variable, before a worker or beat starts. Besides SPEC §6:

- ALERTS_CELERY_VISIBILITY_TIMEOUT_SECONDS (3600): Redis redelivers an unacked task after it;
- ALERTS_REENQUEUE_AFTER_SECONDS (600): when a marked row counts as having lost its task;
- ALERTS_RATELIMIT_REDIS_URL (the broker's URL when it is Redis): the Telegram limit's Redis;
- ALERTS_BEAT_*_SECONDS: the beat intervals (beat_schedule.py).

Delivery guarantees do not depend on the broker: tasks are acked late and may run twice;
the row claims in the database make the second run a no-op.
"""
from __future__ import annotations

import os
import sys

from celery import Celery
from kombu import Queue

import beat_schedule
from alerts import broker
from alerts.config import ConfigError, Settings, EnvReader
from alerts.tasks import DEFAULT_REENQUEUE_AFTER_SECONDS, INFRA_BACKOFF_MAX_SECONDS, MAX_COUNTDOWN_SECONDS

DEFAULT_VISIBILITY_TIMEOUT = 3600
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Every countdown we set must stay well under it, or Redis would hand the waiting task
# to a second worker while the first still holds it.
MIN_VISIBILITY_TIMEOUT = 10 * max(INFRA_BACKOFF_MAX_SECONDS, MAX_COUNTDOWN_SECONDS)

PHASE_QUEUE = "alerts"  # phase runs, dispatch, recovery, ingest: short and few
SEND_QUEUE = "alerts.send"  # one task per message: many; its own queue so a backlog
#                             of sends never delays the next intake or digest build


def _configure(env) -> tuple[Settings, dict]:
    settings = Settings.from_env(env)
    reader = EnvReader(env)
    visibility = reader.integer("ALERTS_CELERY_VISIBILITY_TIMEOUT_SECONDS", DEFAULT_VISIBILITY_TIMEOUT,
                                minimum=MIN_VISIBILITY_TIMEOUT)
    transport = {"visibility_timeout": visibility}
    conf = dict(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers a message not acked within this time; Celery and kombu read
        # it from all three places (broker, result backend, and the top-level key).
        broker_transport_options=dict(transport),
        result_backend_transport_options=dict(transport),
        visibility_timeout=visibility,
        broker_connection_retry_on_startup=True,
        # kombu's Redis transport, sharing one client per channel (alerts/broker.py).
        broker_transport=broker.transport_for(settings.celery_broker_url),
        timezone=settings.timezone,
        enable_utc=True,
        task_default_queue=PHASE_QUEUE,
        task_queues=(Queue(PHASE_QUEUE), Queue(SEND_QUEUE)),
        task_routes={"alerts.send_digest": {"queue": SEND_QUEUE},
                     "alerts.send_delivery": {"queue": SEND_QUEUE}},
        beat_schedule=beat_schedule.build(env),
        alerts_reenqueue_after_seconds=reader.integer("ALERTS_REENQUEUE_AFTER_SECONDS",
                                                      DEFAULT_REENQUEUE_AFTER_SECONDS, minimum=1),
        alerts_ratelimit_redis_url=_ratelimit_url(reader, settings),
    )
    return settings, conf


def _ratelimit_url(reader: EnvReader, settings: Settings) -> str | None:
    """The Redis that holds the Telegram rate limit: the broker's, unless set apart."""
    url = reader.optional("ALERTS_RATELIMIT_REDIS_URL")
    if url is None:
        return settings.celery_broker_url if settings.celery_broker_url.startswith(REDIS_SCHEMES) else None
    if not url.startswith(REDIS_SCHEMES):
        raise ConfigError("ALERTS_RATELIMIT_REDIS_URL", "must be a redis://, rediss:// or unix:// URL")
    return url


try:
    _settings, _conf = _configure(os.environ)
except ConfigError as exc:
    print(f"configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app = Celery("energyriskiq_alerts", broker=_settings.celery_broker_url, include=["alerts.tasks"])
app.conf.update(_conf)
