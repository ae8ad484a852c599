"""Telegram's 4096 limit: lengths as Telegram counts them, truncation, and the fitting."""
from __future__ import annotations

import re

import pytest

from alerts.messages.telegram_fit import fit_telegram, telegram_length, truncate_utf16, utf16_len
from tests.support.telegram_html import parse_telegram_html, telegram_units


# --- the validator itself -----------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    "<script>x</script>", "a & b", "a < b", "a > b", "<b>x", "<b>x</i>", "<br/>",
    '<a href="javascript:alert(1)">x</a>', '<a href="https://x" onclick="y">x</a>', "<span>x</span>",
])
def test_the_validator_refuses_what_telegram_would_refuse(bad):
    with pytest.raises(AssertionError):
        parse_telegram_html(bad)


def test_the_validator_counts_parsed_text_in_utf16_units():
    assert parse_telegram_html('<b>&lt;hi&gt;</b> &amp; <a href="https://x.io/?a=1&amp;b=2">😀</a>') == "<hi> & 😀"
    assert telegram_units("<i>😀&#39;</i>") == 3


# --- lengths ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,units", [
    ("", 0), ("abc", 3), ("é", 1), ("€", 1), ("😀", 2), ("👍🏽", 4), ("a😀b", 4),
])
def test_utf16_len_counts_like_telegram(text, units):
    assert utf16_len(text) == units


@pytest.mark.parametrize("message,units", [
    ("<b>a</b>", 1),
    ("&lt;&amp;&gt;&quot;", 4),
    ("&#39;&#34;", 2),
    ('<a href="https://example.com/?a=1&amp;b=2">link</a>', 4),
    ("<b>😀</b> x", 4),
    ("line\nline", 9),
])
def test_telegram_length_counts_text_after_entity_parsing(message, units):
    assert telegram_length(message) == units
    assert telegram_units(message) == units  # the strict parser agrees


@pytest.mark.parametrize("text,limit,expected", [
    ("hello", 10, "hello"),
    ("hello", 5, "hello"),
    ("hello world", 6, "hello…"),
    ("hello world", 7, "hello…"),  # the trailing space before the cut goes too
    ("ab😀cd", 4, "ab…"),  # the emoji does not fit in the 3 units left: no half emoji
    ("ab😀cd", 5, "ab😀…"),
    ("😀😀😀", 3, "😀…"),
    ("abc", 1, "…"),
    ("abc", 0, ""),
])
def test_truncate_utf16_never_exceeds_the_limit_nor_splits_an_emoji(text, limit, expected):
    assert truncate_utf16(text, limit) == expected
    assert utf16_len(truncate_utf16(text, limit)) <= max(limit, 0)


# --- fitting ------------------------------------------------------------------------------

def more(n: int) -> str:
    return f"+{n}" if n else ""


@pytest.mark.parametrize("blocks,limit,expected", [
    (["aa", "bb", "cc"], 100, "Haabbcc"),  # everything fits, empty footer
    (["aa", "bb", "cc"], 7, "Haabbcc"),  # exactly at the limit
    (["aa", "bb", "cc"], 6, "Haa+2"),  # "Haabb+1" is 7: the footer costs a block
    (["aa", "bb", "cc"], 5, "Haa+2"),
    (["aa", "bb", "cc"], 3, "H+3"),
    (["aaaaaaaaaa", "b", "c"], 6, "H+3"),  # order is kept: small later blocks do not jump in
    (["😀😀"], 5, "H😀😀"),  # emoji count 2
    (["😀😀"], 4, "H+1"),
    (["😀😀", "bb", "c"], 7, "H😀😀+2"),  # "H😀😀bb" is 7, but with "+1" 9
    (["<b>x</b>", "&amp;"], 3, "H<b>x</b>&amp;"),  # tags and entities counted as Telegram does
    ([], 5, "H"),
])
def test_fit_telegram_keeps_leading_blocks_and_counts_the_rest(blocks, limit, expected):
    assert fit_telegram("H", blocks, more, limit=limit) == expected


def test_fit_telegram_shows_plus_left_out_equals_total():
    blocks = [f"[{i}]" for i in range(1000)]  # 3-5 units each
    text = fit_telegram("H", blocks, more, limit=200)
    shown = len(re.findall(r"\[\d+\]", text))
    left_out = int(text.rsplit("+", 1)[1])
    assert shown + left_out == 1000 and telegram_length(text) <= 200


def test_fit_telegram_refuses_a_header_and_footer_that_cannot_fit():
    with pytest.raises(ValueError):
        fit_telegram("HEADER", ["a"], more, limit=4)


def test_fit_telegram_only_draws_the_blocks_that_can_fit_from_a_lazy_source():
    drawn = []

    def blocks():
        for i in range(100_000):
            drawn.append(i)
            yield "x" * 100

    text = fit_telegram("", blocks(), more, total=100_000, limit=4096)
    assert text.endswith("+99960") and len(drawn) == 41  # 40 kept, 1 that did not fit
