"""Retry policy: what a failed send attempt turns into. Pure functions, no I/O."""
from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from alerts.core import tables as m
from alerts.channels import DeliveryError
from alerts.core.settings import Settings


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half the step is fixed, half random.

    attempt 1 waits base, 2 waits 2·base, … never more than cap; the jitter spreads
    retries of a provider outage so they do not all return in the same second, while
    the fixed half keeps a floor under every wait.
    """
    step = min(cap, base * 2 ** max(attempt - 1, 0))
    return step / 2 + (rng or random).uniform(0, step / 2)


@dataclass(frozen=True)
class Outcome:
    status: str  # sent | queued (retry later) | failed | skipped
    last_error: str | None = None
    next_retry_at: datetime | None = None
    sent_at: datetime | None = None
    gone: bool = False  # failed because the destination itself is gone: block it (§11.3)


def sent(now: datetime) -> Outcome:
    return Outcome(m.SENT, sent_at=now)


def skipped(reason: str) -> Outcome:
    return Outcome(m.SKIPPED, last_error=reason)


def failed(reason: str) -> Outcome:
    """Failed at once, without a provider's answer (our own error)."""
    return Outcome(m.FAILED, last_error=reason)


def after_failure(error: DeliveryError, attempts: int, now: datetime, settings: Settings,
                  rng: random.Random | None = None) -> Outcome:
    """Permanent errors fail at once; transient ones retry until max_attempts is used."""
    if error.permanent:
        return Outcome(m.FAILED, last_error=error.reason, gone=error.gone)
    if attempts >= settings.max_attempts:
        return Outcome(m.FAILED, last_error=f"{error.reason} (gave up after {attempts} attempts)")
    wait = backoff_seconds(attempts, settings.retry_base_seconds, settings.retry_max_seconds, rng)
    if error.retry_after is not None:
        wait = max(wait, float(error.retry_after))
    return Outcome(m.QUEUED, last_error=error.reason, next_retry_at=now + timedelta(seconds=wait))
