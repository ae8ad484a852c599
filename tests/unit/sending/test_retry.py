import random
from datetime import datetime, timedelta, timezone

import pytest

from alerts.sending import retry
from alerts.channels import DeliveryError
from alerts.core.settings import Settings

NOW = datetime(2026, 5, 12, 12, 0, tzinfo=timezone.utc)
SETTINGS = Settings.from_env({})  # base 60 s, cap 3600 s, 5 attempts


@pytest.mark.parametrize("attempt,low,high", [
    (1, 30, 60), (2, 60, 120), (3, 120, 240), (4, 240, 480), (7, 1800, 3600), (30, 1800, 3600),
])
def test_backoff_doubles_per_attempt_with_jitter_and_a_cap(attempt, low, high):
    waits = [retry.backoff_seconds(attempt, 60, 3600, random.Random(seed)) for seed in range(200)]
    assert low <= min(waits) and max(waits) <= high
    assert len(set(waits)) > 100  # jittered, not a constant


def test_a_permanent_error_fails_at_once():
    outcome = retry.after_failure(DeliveryError("smtp 550 5.1.1 no such user", permanent=True), 1, NOW, SETTINGS)
    assert (outcome.status, outcome.last_error, outcome.next_retry_at) == ("failed", "smtp 550 5.1.1 no such user", None)


def test_a_transient_error_is_retried_later():
    outcome = retry.after_failure(DeliveryError("smtp 451 try later"), 1, NOW, SETTINGS, random.Random(1))
    assert outcome.status == "queued"
    assert NOW + timedelta(seconds=30) <= outcome.next_retry_at <= NOW + timedelta(seconds=60)


def test_retry_after_is_never_undercut_even_beyond_the_cap():
    outcome = retry.after_failure(DeliveryError("telegram 429", retry_after=7200), 1, NOW, SETTINGS)
    assert outcome.next_retry_at >= NOW + timedelta(seconds=7200)


def test_the_last_allowed_attempt_fails_the_row():
    outcome = retry.after_failure(DeliveryError("timeout"), SETTINGS.max_attempts, NOW, SETTINGS)
    assert outcome.status == "failed"
    assert "gave up after 5 attempts" in outcome.last_error
