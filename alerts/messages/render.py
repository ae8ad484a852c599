"""Pieces shared by instant and digest rendering: the Jinja2 environments, severity
labels, and the defensive view of one event that every template receives."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from email.utils import getaddresses
from typing import Mapping, Sequence
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2

from alerts.core.settings import Settings
from alerts.messages.telegram_fit import truncate_utf16

MESSAGE_ID_DOMAIN = "alerts.energyriskiq.com"  # when ALERTS_EMAIL_FROM names no usable domain
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9-]")
SEVERITY_LABELS = {1: "low", 2: "moderate", 3: "elevated", 4: "high", 5: "critical"}
_WHITESPACE = re.compile(r"\s")  # the same characters as str.isspace()
_UNSAFE_IN_URL = re.compile(r'[<>"{}|\\^`]')  # never valid unencoded in a URL (RFC 3986)

_loader = jinja2.PackageLoader("alerts.messages", "templates")
# Templates ship inside the package and never change under a running process: compile
# each once and never stat its file again (auto_reload would, on every render and import).
_common = dict(loader=_loader, undefined=jinja2.StrictUndefined, trim_blocks=True,
               lstrip_blocks=True, keep_trailing_newline=False, auto_reload=False, cache_size=-1)
# HTML email and Telegram HTML: everything from an event is escaped. Markupsafe writes
# &amp; &lt; &gt; &#34; &#39;, all of which Telegram's HTML parse mode accepts.
html_env = jinja2.Environment(autoescape=True, **_common)
# text/plain email and SMS: nothing to escape, and escaping would show "&amp;" to people.
text_env = jinja2.Environment(autoescape=False, **_common)


def severity_label(n: int) -> str:
    return SEVERITY_LABELS.get(n, f"severity {n}")


def one_line(text: str) -> str:
    """All whitespace runs (CR, LF, tabs, U+2028…) as one space: safe in headers and titles."""
    return " ".join(text.split())


def safe_url(url: object) -> str | None:
    """The url when it is an absolute http(s) URL, else None: no javascript: links, ever.
    Characters a URL may never hold as they are (``<`` ``>`` ``"`` …) are percent-encoded,
    as a browser would, so no parser of an href (Telegram's included) meets them."""
    if not isinstance(url, str):
        return None
    url = url.strip()
    parsed = urlparse(url)
    if parsed.scheme.lower() not in ("http", "https") or not parsed.netloc or _WHITESPACE.search(url):
        return None
    return _UNSAFE_IN_URL.sub(lambda m: f"%{ord(m.group()):02X}", url)


def message_id(local: str, settings: Settings, installation_id: str | None) -> str:
    """``<local.installation@domain>``: deterministic for one delivery or digest (the same
    on every retry), with the domain of ALERTS_EMAIL_FROM and the installation's own
    identifier (made at its first ``alerts migrate``), so two databases — staging and
    production — never give two messages one Message-ID. Callers that have no database
    (tests, a preview without one) pass None and get ``<local@domain>``."""
    installation = _ID_UNSAFE.sub("", installation_id or "")
    left = f"{local}.{installation}" if installation else local
    return f"<{left}@{message_id_domain(settings.email_from)}>"


@functools.lru_cache(maxsize=16)
def message_id_domain(email_from: str) -> str:
    """The domain of the From address, as ASCII (IDNA), lower-case."""
    address = getaddresses([email_from])[0][1]
    domain = address.rpartition("@")[2].strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return MESSAGE_ID_DOMAIN
    return domain if "@" in address and _DOMAIN.fullmatch(domain) else MESSAGE_ID_DOMAIN


def as_utc(value: datetime) -> datetime:
    """Timestamps are aware UTC by contract; a naive one is taken to be UTC, not local."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def zone(name: object, settings: Settings) -> ZoneInfo:
    """The named zone, or the app zone when the name is missing or unknown."""
    if isinstance(name, str) and name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return settings.tz


def app_link(settings: Settings) -> str | None:
    return f"{settings.app_base_url}/alerts" if settings.app_base_url else None


@dataclass(frozen=True)
class EventView:
    """One event as the templates see it: labelled, trimmed, with a link only if safe."""

    id: int
    severity: int
    label: str
    title: str
    summary: str | None
    url: str | None
    url_text: str | None
    alert_type: str
    region: str | None
    created_at: datetime  # in the display zone
    # A digest item standing for several events of one story (§10.3): all their ids, oldest
    # first, and how many there are; one event alone is (id,) and 1.
    ids: tuple[int, ...] = ()
    updates: int = 1
    ids_hidden: int = 0  # older ids left out of ``ids`` where room is short (a Telegram digest)


def event_view(event: Mapping, tz: tzinfo, *, title_max: int | None = None,
               summary_max: int | None = None, url_text_max: int | None = None,
               label_max: int | None = None, ids_max: int | None = None) -> EventView:
    """``*_max`` cap what a size-limited message shows, in UTF-16 units: ``label_max`` the
    alert type and region, ``ids_max`` how many of a story's ids (the newest are kept)."""
    title = one_line(str(event["title"] or "")) or "(untitled)"
    summary = (event.get("summary") or "").strip() or None
    if title_max is not None:
        title = truncate_utf16(title, title_max)
    if summary is not None and summary_max is not None:
        summary = truncate_utf16(summary, summary_max)
    url = safe_url(event.get("url"))
    url_text = url if url is None or url_text_max is None else truncate_utf16(url, url_text_max)
    alert_type, region = event.get("alert_type") or "", event.get("region") or None
    if label_max is not None:
        alert_type = truncate_utf16(one_line(alert_type), label_max)
        region = truncate_utf16(one_line(region), label_max) if region else None
    ids = tuple(event.get("ids") or (event["id"],))
    shown = ids if ids_max is None or len(ids) <= ids_max else ids[len(ids) - ids_max:]
    return EventView(
        id=event["id"], severity=event["severity"], label=severity_label(event["severity"]),
        title=title, summary=summary, url=url, url_text=url_text,
        alert_type=alert_type, region=region,
        created_at=as_utc(event["created_at"]).astimezone(tz),
        ids=shown, updates=event.get("updates") or 1, ids_hidden=len(ids) - len(shown),
    )


def sort_items(items: Sequence[Mapping]) -> list[Mapping]:
    """Highest severity first, then newest, then highest id (so the order is total)."""
    return sorted(items, key=lambda e: (e["severity"], as_utc(e["created_at"]), e["id"]), reverse=True)
