"""The Telegram limiter shared by all workers: fakeredis with a driven clock for the
arithmetic, real Redis (with its own clock) once."""
from __future__ import annotations

import uuid

import fakeredis
import pytest
import redis

from alerts.sending.ratelimit import TELEGRAM_GLOBAL, TELEGRAM_PER_CHAT, Permit, Rate, TelegramLimiter



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
    assert limiter.acquire("42") == Permit(0.0, chat_held=True, go=True)
    clock.ms += gap_ms
    assert limiter.acquire("42").wait == pytest.approx(expected_wait)


def test_sends_waiting_for_one_chat_book_its_seconds_one_after_another(limiter, clock):
    """No stampede: ten tasks asking at once get ten different seconds, and each, woken
    at its second, finds its global slot free."""
    assert limiter.acquire("42").go
    waits = [limiter.acquire("42") for _ in range(9)]
    assert [w.wait for w in waits] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert all(w.chat_held and not w.go for w in waits)
    start = clock.ms
    for permit in waits:
        clock.ms = start + int(permit.wait * 1000)
        assert limiter.acquire("42", chat_held=True) == Permit(0.0, chat_held=True, go=True)


def test_a_wait_longer_than_may_be_booked_books_nothing(limiter, clock):
    assert limiter.acquire("42").go
    assert limiter.acquire("42", max_reserve=0.5) == Permit(1.0, chat_held=False, go=False)
    clock.ms += 1000
    assert limiter.acquire("42").go  # the second was not taken by the refused ask


def test_a_chat_waiting_its_turn_does_not_use_up_the_global_budget(limiter, clock):
    limiter.acquire("42")
    for _ in range(50):
        limiter.acquire("42")  # each books a later second of chat 42 only
    assert [limiter.acquire(chat).wait for chat in ("1", "2", "3", "4")] == [0.0] * 4


def test_different_chats_do_not_wait_for_each_other(limiter):
    assert [limiter.acquire(chat).wait for chat in ("1", "2", "3", "4", "5")] == [0.0] * 5


def test_no_one_second_window_sees_more_than_thirty_messages(limiter, clock):
    """Many chats asking every 2 ms for 5 s, each sending when its booking says."""
    sends = []
    for step in range(2500):
        clock.ms += 2
        permit = limiter.acquire(f"chat-{step}", max_reserve=0.2)
        if permit.go:
            sends.append(clock.ms + int(permit.wait * 1000))
    busiest = max(sum(1 for t in sends if start <= t < start + 1000) for start in sends)
    assert busiest <= 30
    assert len(sends) >= 5 * TELEGRAM_GLOBAL.per_second  # and the budget is used


def test_a_global_wait_books_the_next_free_slot(clock):
    limiter = TelegramLimiter(fakeredis.FakeRedis(), global_rate=Rate(per_second=10, burst=2), clock_ms=clock)
    assert [limiter.acquire(chat).wait for chat in "ab"] == [0.0, 0.0]
    assert limiter.acquire("c") == Permit(0.1, chat_held=True, go=True)
    assert limiter.acquire("d") == Permit(0.2, chat_held=True, go=True)
    clock.ms += 300
    assert limiter.acquire("e").wait == 0.0


@pytest.mark.parametrize("rate, interval_ms", [
    (TELEGRAM_GLOBAL, 40),
    (TELEGRAM_PER_CHAT, 1000),
    (Rate(per_second=30), 34),  # rounded up: never faster than asked
])
def test_rates_become_whole_millisecond_intervals(rate, interval_ms):
    assert rate.interval_ms == interval_ms


def test_the_budget_is_shared_by_limiters_on_one_real_redis(redis_server):
    """Two workers, one Redis, the Redis clock: one chat's slot is handed out once."""
    client = redis.Redis.from_url(redis_server.url(12))
    prefix = f"test:{uuid.uuid4().hex}"
    try:
        worker_a = TelegramLimiter(client, prefix=prefix)
        worker_b = TelegramLimiter(redis.Redis.from_url(redis_server.url(12)), prefix=prefix)
        assert worker_a.acquire("42").go
        booked = worker_b.acquire("42")
        assert 0.9 < booked.wait <= 1.0 and booked.chat_held and not booked.go
        assert worker_b.acquire("43").wait == 0.0
    finally:
        keys = client.keys(f"{prefix}:*")
        if keys:
            client.delete(*keys)
