"""Telegram's send limits, shared by every worker on every machine through Redis.

Telegram allows a bot about 30 messages per second overall and one message per second
to the same chat; past that it answers 429. The limiter is GCRA (the "generic cell rate
algorithm", a token bucket kept as one timestamp per key): one Lua script checks the
global and the per-chat bucket and takes a slot in both, or in neither, atomically.
It never sleeps: ``acquire`` says how long to wait, and the Celery task re-schedules
itself for then instead of holding a worker slot.
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
# clock every machine shares), then interval and burst of each bucket. A bucket is its
# "theoretical arrival time" (TAT): a send is allowed once now ≥ TAT − (burst−1)·interval.
# Returns 0 (slot taken) or the milliseconds to wait (nothing taken).
_SCRIPT = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local tats, waits = {}, {}
for i = 1, 2 do
  local interval = tonumber(ARGV[i * 2])
  local burst = tonumber(ARGV[i * 2 + 1])
  local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or 0), now)
  tats[i] = tat + interval
  waits[i] = tats[i] - interval * burst - now
end
local wait = math.max(waits[1], waits[2])
if wait > 0 then
  return math.ceil(wait)
end
for i = 1, 2 do
  redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', tats[i] - now + 1000)
end
return 0
"""


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

    def acquire(self, chat_id: str | int) -> float:
        """0.0 when this send may go now (its slot is taken), else seconds to wait."""
        now = self._clock_ms() if self._clock_ms else -1
        wait_ms = self._script(
            keys=[f"{self._prefix}:global", f"{self._prefix}:chat:{chat_id}"],
            args=[now, self._global_rate.interval_ms, self._global_rate.burst,
                  self._chat_rate.interval_ms, self._chat_rate.burst],
        )
        return int(wait_ms) / 1000
