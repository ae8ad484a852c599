"""The run's clock (STYLE rule 2): made once — from ``--now`` or the wall clock — by the
runner, the CLI or a Celery task, and handed to every phase, which reads the time from
it and from nothing else.

Time runs on from the start while the run lasts, at the pace of the monotonic clock: a
claim taken ten minutes into a run is stamped ten minutes after ``--now``, and a send's
``sent_at`` and ``next_retry_at`` are the time of that send. A fresh claim is therefore
never dated back into the past, where another process's lease recovery, judging it by
its own clock, would take it for abandoned and send it again (found by the soak).

A clock may carry the run's time limit (``--max-seconds``, docs/deployment.md): ``out_of_time()``
says when it has passed, and the phases stop starting new work then.

Tests pass a clock whose ``monotonic`` they advance by hand instead of sleeping.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Callable

UTC = timezone.utc


class Clock:
    def __init__(self, start: datetime | None = None, *, monotonic: Callable[[], float] = time.monotonic,
                 limit_seconds: float | None = None):
        if start is not None and start.tzinfo is None:
            raise ValueError("a clock starts at a timezone-aware instant")
        self.start = (start or datetime.now(UTC)).astimezone(UTC)
        self._monotonic = monotonic
        self._origin = monotonic()
        self.limit_seconds = limit_seconds

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed())

    def elapsed(self) -> float:
        """Seconds since the clock was made."""
        return self._monotonic() - self._origin

    def out_of_time(self) -> bool:
        """True once ``limit_seconds`` have passed since the clock was made; never without a limit."""
        return self.limit_seconds is not None and self.elapsed() >= self.limit_seconds

    def __repr__(self) -> str:
        return f"Clock(start={self.start.isoformat()}, elapsed={self.elapsed():.3f}s)"


def parse_instant(text: str) -> datetime:
    """An ISO-8601 instant with a UTC offset (``Z`` allowed), as UTC. Raises ValueError
    naming what is wrong."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"needs a UTC offset, e.g. 2026-05-13T00:01:00+00:00 (got {text!r})")
    return parsed.astimezone(UTC)
