"""Phase C — send due instant deliveries, then due digests, a batch at a time.

A thin loop over the one send path (alerts/sending/service.py), which the Celery send
tasks use too: claims, the checks each send makes first (unsubscribes, blocks, the
Telegram limit — slept through here), the sends and their outcomes all happen there.
The clock is the run's (alerts/core/clock.py).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from alerts.channels.registry import ChannelSet
from alerts.core import tables as m
from alerts.core.clock import Clock
from alerts.core.db import Database
from alerts.core.settings import Settings
from alerts.sending import outbox as ob
from alerts.sending import retry
from alerts.sending.outbox import Outbox
from alerts.sending.service import recover_stale, send_claimed

log = logging.getLogger(__name__)


@dataclass
class SendCounts:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, outcome: retry.Outcome) -> None:
        key = "retried" if outcome.status == m.QUEUED else outcome.status
        setattr(self, key, getattr(self, key) + 1)

    def as_dict(self) -> dict:
        return {"sent": self.sent, "retried": self.retried, "failed": self.failed, "skipped": self.skipped}


def run_phase_c(db: Database, clock: Clock, settings: Settings, channels: ChannelSet) -> dict:
    """Recover abandoned sends, then send every due instant delivery, then every due digest."""
    recover_stale(db, clock, settings)
    return {outbox.name: send_due(db, outbox, clock, settings, channels).as_dict() for outbox in ob.OUTBOXES}


def send_due(db: Database, outbox: Outbox, clock: Clock, settings: Settings, channels: ChannelSet,
             rng: random.Random | None = None) -> SendCounts:
    """Claim due rows a batch at a time and send them until none are due."""
    counts = SendCounts()
    while not clock.out_of_time():
        batch = send_claimed(db, outbox, clock, settings, channels, limit=settings.send_batch_size,
                             sleep=time.sleep, rng=rng)
        if not batch.outcomes and batch.deferred is None:
            break
        for outcome in batch.outcomes:
            counts.add(outcome)
    if clock.out_of_time():
        log.warning("time limit of %ss reached: no more %s sends in this run", clock.limit_seconds, outbox.name)
    return counts
