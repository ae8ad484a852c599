"""Runs phases in order, each under its advisory lock: the one entry point shared by the
cron runner, the CLI, the demo and the Celery tasks."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy.engine import Engine

from alerts.channels.registry import ChannelSet, build_channels, recording_channels
from alerts.core.clock import Clock
from alerts.core.settings import Settings
from alerts.core.db import Database
from alerts.phases.digests import run_phase_d
from alerts.phases.fanout import run_phase_b
from alerts.phases.intake import run_phase_a
from alerts.phases.send import run_phase_c
from alerts.sending.ratelimit import runner_limiter

log = logging.getLogger(__name__)

ALL = ("a", "b", "d", "c")

# Every phase: run_phase_x(db, clock, settings, channels) -> counts.
PHASES = {"a": run_phase_a, "b": run_phase_b, "d": run_phase_d, "c": run_phase_c}


def expand(phase: str) -> tuple[str, ...]:
    return ALL if phase == "all" else (phase,)


def run_phases(db: Database, phases: tuple[str, ...], clock: Clock, settings: Settings,
               channels: ChannelSet) -> dict:
    """Run the named phases in order; a phase whose lock is taken reports {"locked": true},
    one not started because the clock's time limit had passed {"not_started": true}.
    The clock runs on through the run: a phase that starts a minute after the run did
    sees a minute later (see alerts.core.clock)."""
    results = {}
    for name in phases:
        if clock.out_of_time():  # --max-seconds: later phases are not started
            log.warning("time limit of %ss reached: phase %s not started", clock.limit_seconds, name)
            results[name] = {"not_started": True}
            continue
        with db.phase_lock(name) as got_lock:
            if not got_lock:
                log.info("phase %s: another run holds the lock; skipping", name)
                results[name] = {"locked": True}
                continue
            results[name] = PHASES[name](db, clock, settings, channels)
            log.info("phase %s: %s", name, results[name])
    return results


@contextmanager
def session(engine: Engine, settings: Settings, *, dry_run: bool = False) -> Iterator[tuple[Database, ChannelSet]]:
    """A Database and the channels for one run; a dry run gets a rolled-back database and
    recording channels."""
    if dry_run:
        with Database.dry_run_of(engine) as db:
            channels = recording_channels(settings)
            try:
                yield db, channels
            finally:
                channels.close()
        return
    channels = build_channels(settings)
    if channels.get("telegram") is not None:
        channels.limiter = runner_limiter(settings.ratelimit_redis_url)
    try:
        yield Database(engine), channels
    finally:
        channels.close()
