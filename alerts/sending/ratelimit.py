"""Telegram's send limits, shared by every worker on every machine through Redis — or,
for a runner with no Redis to share them in (the GitHub Actions cron), kept in its own
process (``LocalLimiter``, the same algorithm).

Telegram allows a bot about 30 messages per second overall and one message per second
to the same chat; past that it answers 429. The limiter is GCRA (the "generic cell rate
algorithm", a token bucket kept as one timestamp per key), checked and updated
atomically by one Lua script.

It never sleeps, and a send that must wait *books* its slot, so that waiting sends do
not stampede: when a chat's second has been used, ``acquire`` reserves that chat's next
free second for the caller and says how long to wait; the Celery task re-schedules
itself for then (instead of holding a worker slot) and, woken, asks only for a slot in
the global budget — which it books the same way, the next free one. Tasks for one chat
thus wake one per second, not all at once. A booking lost with its task (a killed
worker) wastes one slot, never exceeds the limit. Waits longer than ``max_reserve``
book nothing: the caller asks again later.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "alerts:ratelimit:telegram"


@dataclass(frozen=True)
class Rate:
    """``per_second`` on average, up to ``burst`` back to back.

    In any one-second window at most ``per_second + burst`` sends get through.
    """

    per_second: float
    burst: int = 1

    @property
    def interval_ms(self) -> int:
        return math.ceil(1000 / self.per_second)


# 25/s with bursts of 5: never more than 30 in any one second, Telegram's bulk limit.
TELEGRAM_GLOBAL = Rate(per_second=25, burst=5)
# One message per second to a chat.
TELEGRAM_PER_CHAT = Rate(per_second=1, burst=1)

# KEYS: the global bucket, the chat's bucket. ARGV: now in ms (-1: ask Redis, the one
# clock every machine shares); the interval and burst of each bucket; whether the caller
# already holds its chat slot (1/0); the longest wait in ms that may be booked. A bucket
# is its "theoretical arrival time" (TAT): a send is allowed at TAT − (burst−1)·interval.
# Returns {wait ms, chat slot held (1/0), global slot held (1/0)}: the caller may send
# after the wait when both are held.
_SCRIPT = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local g_interval, g_burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local c_interval, c_burst = tonumber(ARGV[4]), tonumber(ARGV[5])
local chat_held, max_reserve = tonumber(ARGV[6]), tonumber(ARGV[7])

local function book(key, tat, interval)
  redis.call('SET', key, string.format('%d', tat + interval), 'PX', tat + interval - now + 1000)
end

local c_tat = math.max(tonumber(redis.call('GET', KEYS[2]) or 0), now)
if chat_held == 0 then
  local c_wait = c_tat - (c_burst - 1) * c_interval - now
  if c_wait > 0 then
    if c_wait > max_reserve then
      return {c_wait, 0, 0}
    end
    book(KEYS[2], c_tat, c_interval)
    return {c_wait, 1, 0}
  end
end

local g_tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
local g_wait = math.max(g_tat - (g_burst - 1) * g_interval - now, 0)
if g_wait > max_reserve then
  return {g_wait, chat_held, 0}
end
book(KEYS[1], g_tat, g_interval)
if chat_held == 0 then
  book(KEYS[2], math.max(c_tat, now + g_wait), c_interval)
end
return {g_wait, 1, 1}
"""


@dataclass(frozen=True)
class Permit:
    """``acquire``'s answer. Send after ``wait`` seconds when ``go`` (both slots are
    booked); else wait that long and ask again, saying whether the chat slot is held."""

    wait: float
    chat_held: bool
    go: bool


class TelegramLimiter:
    """``acquire(chat_id)`` takes a send slot for that chat, or says how long to wait."""

    def __init__(self, redis_client, *, global_rate: Rate = TELEGRAM_GLOBAL,
                 chat_rate: Rate = TELEGRAM_PER_CHAT, prefix: str = KEY_PREFIX,
                 clock_ms: Callable[[], int] | None = None):
        self._script = redis_client.register_script(_SCRIPT)
        self._global_rate = global_rate
        self._chat_rate = chat_rate
        self._prefix = prefix
        self._clock_ms = clock_ms  # tests drive time; production uses the Redis clock

    def acquire(self, chat_id: str | int, *, chat_held: bool = False, max_reserve: float = 60.0) -> Permit:
        """Book what this send may book now; see ``Permit``."""
        now = self._clock_ms() if self._clock_ms else -1
        wait_ms, chat, both = self._script(
            keys=[f"{self._prefix}:global", f"{self._prefix}:chat:{chat_id}"],
            args=[now, self._global_rate.interval_ms, self._global_rate.burst,
                  self._chat_rate.interval_ms, self._chat_rate.burst,
                  int(chat_held), int(max_reserve * 1000)],
        )
        return Permit(int(wait_ms) / 1000, bool(chat), bool(both))


class Limiter(Protocol):
    def acquire(self, chat_id: str | int, *, chat_held: bool = False, max_reserve: float = 60.0) -> Permit: ...


def take_slot(limiter: Limiter, chat_id: str | int, *, sleep: Callable[[float], None] | None, may_sleep: float,
              max_reserve: float, chat_held: bool = False) -> Permit | None:
    """Book a send slot for the chat, sleeping (``sleep``) until it comes when the waits fit
    in ``may_sleep`` seconds. None once the send may go; else the last answer, for a caller
    that must wait longer, or cannot sleep (``sleep`` None): what it booked is in it."""
    while True:
        permit = limiter.acquire(chat_id, chat_held=chat_held, max_reserve=max_reserve)
        if permit.go and permit.wait <= 0:
            return None
        if sleep is None or not (permit.go or permit.chat_held) or permit.wait > may_sleep:
            return permit
        sleep(permit.wait)
        may_sleep -= permit.wait
        if permit.go:
            return None
        chat_held = True


class LocalLimiter:
    """``TelegramLimiter``'s algorithm in this process's memory: the limit of a runner that
    has no Redis to share it in. Same answers, same bookings; thread-safe."""

    def __init__(self, *, global_rate: Rate = TELEGRAM_GLOBAL, chat_rate: Rate = TELEGRAM_PER_CHAT,
                 clock_ms: Callable[[], int] | None = None):
        self._global_rate, self._chat_rate = global_rate, chat_rate
        self._clock_ms = clock_ms or (lambda: int(time.monotonic() * 1000))
        self._tats: dict[str, int] = {}  # theoretical arrival time per bucket, in ms
        self._lock = threading.Lock()

    def acquire(self, chat_id: str | int, *, chat_held: bool = False, max_reserve: float = 60.0) -> Permit:
        with self._lock:
            now, max_ms = self._clock_ms(), int(max_reserve * 1000)
            g, c = self._global_rate, self._chat_rate
            chat_key = f"chat:{chat_id}"
            c_tat = max(self._tats.get(chat_key, 0), now)
            if not chat_held:
                c_wait = c_tat - (c.burst - 1) * c.interval_ms - now
                if c_wait > 0:
                    if c_wait > max_ms:
                        return Permit(c_wait / 1000, False, False)
                    self._tats[chat_key] = c_tat + c.interval_ms
                    return Permit(c_wait / 1000, True, False)
            g_tat = max(self._tats.get("global", 0), now)
            g_wait = max(g_tat - (g.burst - 1) * g.interval_ms - now, 0)
            if g_wait > max_ms:
                return Permit(g_wait / 1000, chat_held, False)
            self._tats["global"] = g_tat + g.interval_ms
            if not chat_held:
                self._tats[chat_key] = max(c_tat, now + g_wait) + c.interval_ms
            self._prune(now)
            return Permit(g_wait / 1000, True, True)

    def _prune(self, now: int) -> None:
        if len(self._tats) > 10_000:  # chats whose second has long passed hold nothing
            self._tats = {k: v for k, v in self._tats.items() if v > now}


REDIS_PROBE_TIMEOUT_SECONDS = 1.0


def runner_limiter(redis_url: str | None) -> Limiter:
    """The limit a one-shot runner asks: the Redis one the Celery workers share when that
    Redis answers (cron and Celery side by side stay within Telegram's limits together),
    else one of its own (a runner with no Redis, like the GitHub Actions cron)."""
    if redis_url:
        client = redis.Redis.from_url(redis_url, socket_timeout=REDIS_PROBE_TIMEOUT_SECONDS,
                                      socket_connect_timeout=REDIS_PROBE_TIMEOUT_SECONDS)
        try:
            client.ping()
            return TelegramLimiter(client)
        except redis.exceptions.RedisError as exc:
            client.close()
            log.info("no Redis for the Telegram limit (%s): keeping it in this process", type(exc).__name__)
    return LocalLimiter()
