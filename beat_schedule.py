"""What ``celery -A celery_app beat`` triggers, and how often (``ALERTS_BEAT_*_SECONDS``,
parsed with every other setting in alerts/core/settings.py).

Every entry expires after one interval: when the workers are down, beat does not pile up
a backlog of identical phase runs. Two beats at once are safe — phases hold advisory
locks, rows are enqueued once, and only one claim per row can win.
"""
from __future__ import annotations

from alerts.core.settings import Settings

# (entry, task, kwargs, the Settings field holding its interval)
ENTRIES = (
    ("intake-and-fanout", "alerts.run_pipeline", {"phases": "ab"}, "beat_intake_seconds"),
    ("build-digests", "alerts.build_digests", {}, "beat_digest_seconds"),
    ("dispatch-deliveries", "alerts.dispatch_deliveries", {}, "beat_dispatch_seconds"),
    ("recover-stale", "alerts.recover_stale", {}, "beat_recover_seconds"),
)


def build(settings: Settings) -> dict:
    """The beat_schedule setting."""
    schedule = {}
    for name, task, kwargs, field in ENTRIES:
        seconds = float(getattr(settings, field))
        schedule[name] = {"task": task, "schedule": seconds, "kwargs": dict(kwargs), "options": {"expires": seconds}}
    return schedule
