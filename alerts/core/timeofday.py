"""Times of day as ``HH:MM``: the one format of send times and quiet hours, shared by
settings (environment values) and the delivery policy (users' columns)."""
from __future__ import annotations

from datetime import time


def parse_time_of_day(text: str) -> time:
    """``HH:MM`` (00:00 … 23:59) as a time of day; ValueError otherwise."""
    digits = text[:2] + text[3:]
    if len(text) != 5 or text[2] != ":" or not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"not a time of day as HH:MM: {text!r}")
    return time(int(text[:2]), int(text[3:]))
