"""Telegram's send limits, shared by every worker on every machine through Redis.

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

import math
from dataclasses import dataclass
from typing import Callable

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
