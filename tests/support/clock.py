"""A clock for tests: it moves only when told to, so tests advance time instead of
sleeping, and every timestamp a phase writes is known exactly."""
from __future__ import annotations

from datetime import datetime

from alerts.channels.registry import ChannelSet
from alerts.core.clock import Clock

NO_CHANNELS = ChannelSet()  # for phases that send nothing (A, B, D)


class ManualClock(Clock):
    def __init__(self, start: datetime):
        self._seconds = 0.0
        super().__init__(start, monotonic=lambda: self._seconds)

    def advance(self, seconds: float) -> "ManualClock":
        self._seconds += seconds
        return self


def clock_at(start: datetime) -> ManualClock:
    """A clock standing at ``start``."""
    return ManualClock(start)
