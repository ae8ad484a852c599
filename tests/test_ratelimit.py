"""The Telegram limiter shared by all workers: fakeredis with a driven clock for the
arithmetic, real Redis (with its own clock) once."""
from __future__ import annotations

import uuid

import fakeredis
import pytest
import redis

from alerts.ratelimit import TELEGRAM_GLOBAL, TELEGRAM_PER_CHAT, Rate, TelegramLimiter

REAL_REDIS_URL = "redis://127.0.0.1:6379/12"


class Clock:
    def __init__(self, ms: int = 1_800_000_000_000):
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def limiter(clock):
    return TelegramLimiter(fakeredis.FakeRedis(), clock_ms=clock)


@pytest.mark.parametrize("gap_ms, expected_wait", [
    (0, 1.0),
    (1, 0.999),
    (300, 0.7),
    (999, 0.001),
    (1000, 0.0),
    (5000, 0.0),
])
def test_a_second_message_to_one_chat_waits_out_the_second(limiter, clock, gap_ms, expected_wait):
    assert limiter.acquire("42") == 0.0
    clock.ms += gap_ms
    assert limiter.acquire("42") == pytest.approx(expected_wait)


def test_a_refused_send_takes_no_slot(limiter, clock):
    assert limiter.acquire("42") == 0.0
    clock.ms += 500
    assert limiter.acquire("42") == 0.5
    assert limiter.acquire("42") == 0.5  # asking again does not push the slot back
    clock.ms += 500
    assert limiter.acquire("42") == 0.0


def test_different_chats_do_not_wait_for_each_other(limiter):
    assert [limiter.acquire(chat) for chat in ("1", "2", "3", "4", "5")] == [0.0] * 5


def test_a_chat_waiting_its_turn_does_not_use_up_the_global_budget(limiter, clock):
    limiter.acquire("42")
    for _ in range(50):
        limiter.acquire("42")  # all refused
    assert [limiter.acquire(chat) for chat in ("1", "2", "3", "4")] == [0.0] * 4


def test_no_one_second_window_sees_more_than_thirty_messages(limiter, clock):
    """Many chats asking every 2 ms for 5 s: what gets through, per sliding second."""
    allowed = []
    for step in range(2500):
        clock.ms += 2
        if limiter.acquire(f"chat-{step}") == 0.0:
            allowed.append(clock.ms)
    busiest = max(sum(1 for t in allowed if start <= t < start + 1000) for start in allowed)
    assert busiest <= 30
    assert len(allowed) >= 5 * TELEGRAM_GLOBAL.per_second  # and the budget is used


def test_the_wait_is_exactly_when_the_global_budget_frees_a_slot(clock):
    limiter = TelegramLimiter(fakeredis.FakeRedis(), global_rate=Rate(per_second=10, burst=2), clock_ms=clock)
    assert [limiter.acquire(chat) for chat in "ab"] == [0.0, 0.0]
    assert limiter.acquire("c") == 0.1
    clock.ms += 100
    assert limiter.acquire("c") == 0.0


@pytest.mark.parametrize("rate, interval_ms", [
    (TELEGRAM_GLOBAL, 40),
    (TELEGRAM_PER_CHAT, 1000),
    (Rate(per_second=30), 34),  # rounded up: never faster than asked
])
def test_rates_become_whole_millisecond_intervals(rate, interval_ms):
    assert rate.interval_ms == interval_ms


def test_the_budget_is_shared_by_limiters_on_one_real_redis():
    """Two workers, one Redis, the Redis clock: one chat's slot is handed out once."""
    client = redis.Redis.from_url(REAL_REDIS_URL)
    prefix = f"test:{uuid.uuid4().hex}"
    try:
        worker_a = TelegramLimiter(client, prefix=prefix)
        worker_b = TelegramLimiter(redis.Redis.from_url(REAL_REDIS_URL), prefix=prefix)
        assert worker_a.acquire("42") == 0.0
        assert 0.9 < worker_b.acquire("42") <= 1.0
        assert worker_b.acquire("43") == 0.0
    finally:
        keys = client.keys(f"{prefix}:*")
        if keys:
            client.delete(*keys)
