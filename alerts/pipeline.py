"""Runs phases in order, each under its advisory lock: the one entry point shared by the
cron runner, the CLI, the demo and the Celery tasks."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Iterator

from sqlalchemy.engine import Engine

from alerts.channels.registry import ChannelSet, build_channels, recording_channels
from alerts.config import Settings
from alerts.db import Database
from alerts.phases.digests import run_phase_d
from alerts.phases.fanout import run_phase_b
from alerts.phases.intake import run_phase_a
from alerts.phases.send import run_phase_c

log = logging.getLogger(__name__)

ALL = ("a", "b", "d", "c")

_PHASES = {
    "a": lambda db, now, settings, channels: run_phase_a(db, now, settings),
    "b": lambda db, now, settings, channels: run_phase_b(db, now, settings),
    "d": lambda db, now, settings, channels: run_phase_d(db, now, settings),
    "c": run_phase_c,
}


def expand(phase: str) -> tuple[str, ...]:
    return ALL if phase == "all" else (phase,)


def run_phases(db: Database, phases: tuple[str, ...], now: datetime, settings: Settings,
               channels: ChannelSet) -> dict:
    """Run the named phases in order; a phase whose lock is taken reports {"locked": true}.

    Time runs on from ``now`` while the run lasts (in whole seconds): a phase that starts
    a minute after the run did sees ``now`` + 1 min, so what it stamps — a claim above
    all, which other processes judge against their own clocks for the lease — is not
    dated back to the start of a long run.
    """
    results = {}
    started = time.monotonic()
    for name in phases:
        phase_now = now + timedelta(seconds=int(time.monotonic() - started))
        with db.phase_lock(name) as got_lock:
            if not got_lock:
                log.info("phase %s: another run holds the lock; skipping", name)
                results[name] = {"locked": True}
                continue
            results[name] = _PHASES[name](db, phase_now, settings, channels)
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
    try:
        yield Database(engine), channels
    finally:
        channels.close()
