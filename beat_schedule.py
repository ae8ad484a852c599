"""What ``celery -A celery_app beat`` triggers, and how often.

Each interval can be changed with an environment variable (whole seconds). Every entry
expires after one interval: when the workers are down, beat does not pile up a backlog of
identical phase runs. Two beats at once are safe — phases hold advisory locks, rows are
enqueued once, and only one claim per row can win.
"""
from __future__ import annotations

import os
from typing import Mapping

from alerts.config import EnvReader

# (entry, task, kwargs, env var, default seconds)
ENTRIES = (
    ("intake-and-fanout", "alerts.run_pipeline", {"phases": "ab"}, "ALERTS_BEAT_INTAKE_SECONDS", 30),
    ("build-digests", "alerts.build_digests", {}, "ALERTS_BEAT_DIGEST_SECONDS", 60),
    ("dispatch-deliveries", "alerts.dispatch_deliveries", {}, "ALERTS_BEAT_DISPATCH_SECONDS", 15),
    ("recover-stale", "alerts.recover_stale", {}, "ALERTS_BEAT_RECOVER_SECONDS", 60),
)


def build(env: Mapping[str, str] | None = None) -> dict:
    """The beat_schedule setting; raises ConfigError naming a bad variable."""
    reader = EnvReader(os.environ if env is None else env)
    schedule = {}
    for name, task, kwargs, variable, default in ENTRIES:
        seconds = reader.integer(variable, default, minimum=1)
        schedule[name] = {"task": task, "schedule": float(seconds), "kwargs": dict(kwargs),
                          "options": {"expires": float(seconds)}}
    return schedule
