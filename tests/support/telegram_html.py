"""A strict stand-in for Telegram's HTML parse mode, used on everything we would send."""
from __future__ import annotations

import re
from html.parser import HTMLParser
# Tags Telegram's parse_mode=HTML knows, with the attributes each may carry.
TELEGRAM_TAGS = {"b": set(), "strong": set(), "i": set(), "em": set(), "u": set(), "ins": set(),
                 "s": set(), "strike": set(), "del": set(), "code": set(), "pre": set(),
                 "blockquote": set(), "tg-spoiler": set(), "a": {"href"}}
_BAD_AMP = re.compile(r"&(?!(?:lt|gt|amp|quot|#[0-9]+|#x[0-9a-fA-F]+);)")
_TAG_START = re.compile(r"<(?!/?(?:%s)[\s>])" % "|".join(map(re.escape, TELEGRAM_TAGS)))


class _StrictTelegramParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        assert tag in TELEGRAM_TAGS, f"tag <{tag}> is not supported by Telegram"
        names = {name for name, _ in attrs}
        assert names <= TELEGRAM_TAGS[tag], f"<{tag}> with attributes {names}"
        if tag == "a":
            (href,) = [value for name, value in attrs if name == "href"]
            assert re.match(r"https?://[^\s\"<>]+$", href), f"bad href {href!r}"
        self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> does not close {self.open}"
        self.open.pop()

    def handle_startendtag(self, tag, attrs):
        raise AssertionError(f"self-closing <{tag}/> is not Telegram HTML")

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        raise AssertionError("comment in Telegram HTML")

    def handle_decl(self, decl):
        raise AssertionError("declaration in Telegram HTML")

    def handle_pi(self, data):
        raise AssertionError("processing instruction in Telegram HTML")


def parse_telegram_html(message: str) -> str:
    """The text Telegram would show, or AssertionError where Telegram would refuse or
    misread the message (unknown tag, unescaped & < >, unbalanced tags)."""
    assert not _BAD_AMP.search(message), f"unescaped & near {message[_BAD_AMP.search(message).start():][:30]!r}"
    assert not _TAG_START.search(message), "unescaped < or unsupported tag"
    assert ">" not in re.sub(r"<[^>]*>", "", message), "unescaped > in text"
    parser = _StrictTelegramParser()
    parser.feed(message)
    parser.close()
    assert not parser.open, f"unclosed tags {parser.open}"
    return "".join(parser.text)


def telegram_units(message: str) -> int:
    """Length after entity parsing, in UTF-16 code units: what Telegram holds to 4096."""
    return len(parse_telegram_html(message).encode("utf-16-le")) // 2
