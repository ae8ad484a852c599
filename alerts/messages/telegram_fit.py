"""Telegram's 4096-character limit, counted the way Telegram counts it.

The Bot API measures a message *after entity parsing* (tags removed, ``&lt;`` one
character) in UTF-16 code units, so an emoji outside the BMP counts 2. These functions
work on the Telegram HTML we render ourselves: every ``<`` in it opens a tag, because all
event text has been escaped.
"""
from __future__ import annotations

import html
import re
from typing import Callable, Iterable

TELEGRAM_LIMIT = 4096
ELLIPSIS = "…"

_TAG = re.compile(r"<[^>]*>")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def telegram_length(telegram_html: str) -> int:
    """Length of the text Telegram shows for ``telegram_html``, in UTF-16 units."""
    return utf16_len(html.unescape(_TAG.sub("", telegram_html)))


def truncate_utf16(text: str, max_units: int) -> str:
    """``text`` cut to at most ``max_units`` UTF-16 units, ending in "…" when cut.

    Never splits a surrogate pair (an emoji stays whole or goes).
    """
    if utf16_len(text) <= max_units:
        return text
    if max_units <= 0:
        return ""
    budget = max_units - 1  # room for the ellipsis
    out, used = [], 0
    for ch in text:
        width = 2 if ord(ch) > 0xFFFF else 1
        if used + width > budget:
            break
        out.append(ch)
        used += width
    return "".join(out).rstrip() + ELLIPSIS


def fit_telegram(header: str, blocks: Iterable[str], footer: Callable[[int], str], *,
                 total: int | None = None, limit: int = TELEGRAM_LIMIT) -> str:
    """``header`` + as many leading ``blocks`` as fit + ``footer(number_left_out)``.

    Blocks are kept in the order given (the caller sorts them, most important first) and
    the first block that does not fit ends the list, so "shown + left out = total" always
    holds. Lengths are accumulated, never re-measured: blocks may be a lazy iterable and
    only the ones that can fit are ever produced. ``total`` is the number of blocks when
    ``blocks`` has no ``len()``.
    """
    if total is None:
        total = len(blocks)  # type: ignore[arg-type]
    used = telegram_length(header)
    kept: list[str] = []
    widths: list[int] = []
    for block in blocks:
        width = telegram_length(block)
        if used + width > limit:
            break
        kept.append(block)
        widths.append(width)
        used += width
    # The footer's length depends on how many are left out; give back blocks until it fits.
    while True:
        tail = footer(total - len(kept))
        if used + telegram_length(tail) <= limit:
            return header + "".join(kept) + tail
        if not kept:
            raise ValueError("the header and footer alone exceed the Telegram limit")
        used -= widths.pop()
        kept.pop()
