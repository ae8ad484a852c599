"""Phase A — intake: validate and normalise new events (docs/intake.md).

Every ``new`` event becomes ``ready`` or ``rejected`` with a reason naming the field.
The rules live in one pure function, ``validate_event``, so they are tested as a table
and read in one place. URL and alert_type checks are easier to get right in Python than
in two SQL dialects, so the phase reads new events in batches (only the columns the
rules need, so memory stays flat on any backlog), judges them in Python, bulk-inserts
the verdicts into a temporary table and finally applies them all with two set-based
UPDATEs — never one round trip per row.

``created_at`` is the one field judged in SQL: a plain INSERT can store a time the
driver cannot even read back (PostgreSQL's ``infinity``, a year past 9999), so the batch
reads whether it lies in the accepted range, and its text, never the value itself — one
such row cannot break the batch. Only accepted events' times reach the window math.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Mapping
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.channels.registry import ChannelSet
from alerts.core.clock import Clock
from alerts.core.settings import Settings
from alerts.core.db import Database, is_postgres

BATCH_SIZE = 1000
MIN_SEVERITY, MAX_SEVERITY = 1, 5
MAX_TITLE_CHARS = 500
MAX_SUMMARY_CHARS = 2000
MAX_URL_CHARS = 2048
ALERT_TYPE_RE = re.compile(r"[a-z0-9_.-]+")
MAX_ALERT_TYPE_CHARS = 64
MAX_REGION_CHARS = 64
# created_at from 2000-01-01 up to (not including) 2100-01-01 UTC: every window, key and
# date the pipeline computes from it stays far from the ends of what datetime can hold.
CREATED_AT_FROM = datetime(2000, 1, 1, tzinfo=timezone.utc)
CREATED_AT_UNTIL = datetime(2100, 1, 1, tzinfo=timezone.utc)
URL_SCHEMES = ("http", "https")
SHOWN_VALUE_CHARS = 40  # how much of a bad value a reject reason quotes
# Control characters (Cc) other than the whitespace ones a text may legitimately hold.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x84\x86-\x9f]")
_LINE_BREAK = re.compile(r"\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_CC = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # exactly Unicode category Cc, line breaks and tabs included

_scratch = sa.MetaData()
# One row per judged event: a reason if rejected, else the normalised fields.
_verdicts = sa.Table(
    "intake_verdicts", _scratch,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("reject_reason", sa.Text),
    sa.Column("alert_type", sa.Text),
    sa.Column("title", sa.Text),
    sa.Column("summary", sa.Text),
    sa.Column("url", sa.Text),
    sa.Column("collapse_key", sa.Text),
    prefixes=["TEMPORARY"],
)


def run_phase_a(db: Database, clock: Clock, settings: Settings, channels: ChannelSet) -> dict:
    """Judge every ``new`` event. The caller holds the phase lock. Intake depends on
    neither the time, the settings nor the channels; they keep the phase signature."""
    counts = {"accepted": 0, "rejected": 0}
    with db.transaction() as conn:
        if not _has_new(conn):
            return counts
        _verdicts.create(conn)
        after = 0
        while batch := _next_batch(conn, after):
            after = batch[-1]["id"]
            conn.execute(sa.insert(_verdicts), [_verdict(row) for row in batch])
        if is_postgres(conn):
            conn.exec_driver_sql(f"ANALYZE {_verdicts.name}")  # a fresh temp table has no statistics
        counts["accepted"], counts["rejected"] = _apply(conn)
        _verdicts.drop(conn)
    return counts


def validate_event(row) -> str | None:
    """Why an event must be rejected ("field: problem; …"), or None when it is good.

    ``row`` is any mapping with title, severity, alert_type, url and (optionally)
    summary, region, collapse_key and the time: ``created_at`` as a datetime, or — as
    the phase reads it — ``created_at_in_range`` (judged in SQL) and ``created_at_text``.
    Surrounding whitespace is forgiven (``normalise`` strips it); everything else is
    judged as given — an upper-case alert_type is rejected, not lower-cased, so a
    producer's typo is visible instead of silently matching other preferences.
    """
    problems = [
        _check_title(row.get("title")),
        _check_severity(row.get("severity")),
        _check_alert_type(row.get("alert_type")),
        _check_region(row.get("region")),
        _check_url(row.get("url")),
        _check_summary(row.get("summary")),
        _check_collapse_key(row.get("collapse_key")),
        _check_created_at(row),
    ]
    problems = [p for p in problems if p]
    return "; ".join(problems) or None


def normalise(row) -> dict:
    """The stored form of a good event: surrounding whitespace stripped; a blank summary
    or url becomes NULL. The title becomes one line and loses control characters, so no
    message (an email Subject, a terminal) can be steered by what a producer wrote; the
    summary keeps its line breaks (as plain newlines) and loses other control characters."""
    return {
        "alert_type": row["alert_type"].strip(),
        "title": one_line_title(row["title"]),
        "summary": _strip_or_none(_clean_summary(row.get("summary"))),
        "url": _strip_or_none(row.get("url")),
        "collapse_key": _strip_or_none(row.get("collapse_key")),
    }


def one_line_title(title: str) -> str:
    """Whitespace runs (CR, LF, tab, U+2028 …) as one space; other control characters
    (NUL, ESC, DEL, C1) dropped."""
    return " ".join(_CONTROL.sub("", _LINE_BREAK.sub(" ", title)).split())


def _clean_summary(summary: str | None) -> str | None:
    if summary is None:
        return None
    return _CONTROL.sub("", _LINE_BREAK.sub("\n", summary))


# --- the rules --------------------------------------------------------------------------

def _check_title(title) -> str | None:
    if not isinstance(title, str) or _is_blank(title):
        return "title: empty"
    if len(one_line_title(title)) > MAX_TITLE_CHARS:
        return f"title: longer than {MAX_TITLE_CHARS} characters"
    return None


def _check_severity(severity) -> str | None:
    if isinstance(severity, bool) or not isinstance(severity, int):
        return f"severity: must be a whole number from {MIN_SEVERITY} to {MAX_SEVERITY}"
    if not MIN_SEVERITY <= severity <= MAX_SEVERITY:
        return f"severity: must be from {MIN_SEVERITY} to {MAX_SEVERITY} (got {severity})"
    return None


def _check_alert_type(alert_type) -> str | None:
    if not isinstance(alert_type, str) or not alert_type.strip():
        return "alert_type: empty"
    if len(alert_type.strip()) > MAX_ALERT_TYPE_CHARS:
        return f"alert_type: longer than {MAX_ALERT_TYPE_CHARS} characters"
    if not ALERT_TYPE_RE.fullmatch(alert_type.strip()):
        return f"alert_type: must match [a-z0-9_.-]+ (got {_shown(alert_type.strip())})"
    return None


def _check_region(region) -> str | None:
    """Optional; matched for equality against preferences, shown in every message."""
    if region is None:
        return None
    if not isinstance(region, str):
        return "region: must be text"
    if len(region) > MAX_REGION_CHARS:
        return f"region: longer than {MAX_REGION_CHARS} characters"
    if _CC.search(region):
        return "region: contains control characters (line breaks, tabs or others)"
    return None


def _check_created_at(row: Mapping) -> str | None:
    in_range = row.get("created_at_in_range")
    text = row.get("created_at_text")
    created_at = row.get("created_at")
    if in_range is None and isinstance(created_at, datetime):
        if created_at.tzinfo is None:  # as the UTC columns read it
            created_at = created_at.replace(tzinfo=timezone.utc)
        in_range = CREATED_AT_FROM <= created_at < CREATED_AT_UNTIL
        text = created_at.isoformat()
    if in_range is None or in_range:
        return None
    return (f"created_at: must be from {CREATED_AT_FROM:%Y-%m-%d} up to (not including) "
            f"{CREATED_AT_UNTIL:%Y-%m-%d} UTC (got {_shown(str(text))})")


def _check_summary(summary) -> str | None:
    if isinstance(summary, str) and len(_clean_summary(summary).strip()) > MAX_SUMMARY_CHARS:
        return f"summary: longer than {MAX_SUMMARY_CHARS} characters"
    return None


def _check_collapse_key(key) -> str | None:
    """Optional; one story's key, compared for equality only (§10.3)."""
    if key is not None and not isinstance(key, str):
        return "collapse_key: must be text"
    if isinstance(key, str) and len(key.strip()) > m.MAX_COLLAPSE_KEY_CHARS:
        return f"collapse_key: longer than {m.MAX_COLLAPSE_KEY_CHARS} characters"
    return None


def _check_url(url) -> str | None:
    """An absolute http(s) URL with a host, or nothing at all (NULL or blank)."""
    if url is None or (isinstance(url, str) and not url.strip()):
        return None
    if not isinstance(url, str):
        return "url: must be text"
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        return f"url: longer than {MAX_URL_CHARS} characters"
    # Browsers and mail clients quietly drop or reinterpret these, which is how
    # "https://ok.example\tjavascript:..." style tricks get through naive checks.
    # isprintable() is False for every control, format (zero-width, bidi) and
    # separator character except the ASCII space.
    if " " in url or not url.isprintable():
        return "url: contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 — raises ValueError on a bad port
    except ValueError:
        return "url: not a valid URL"
    if parts.scheme.lower() not in URL_SCHEMES:
        scheme = _shown(parts.scheme) if parts.scheme else "none"
        return f"url: must be an absolute http(s) URL (scheme {scheme})"
    if not parts.hostname:
        return "url: must be an absolute http(s) URL with a host"
    if "@" in parts.netloc:
        # "https://energyriskiq.com@evil.example/" shows one host and opens another.
        return "url: must not contain user info (user@host)"
    return None


def _is_blank(text: str) -> bool:
    """Nothing a reader would see: only whitespace, control or zero-width characters."""
    return all(ch.isspace() or not ch.isprintable() for ch in text)


def _shown(value: str) -> str:
    """A bad value quoted safely and briefly inside a reason."""
    if len(value) > SHOWN_VALUE_CHARS:
        value = value[:SHOWN_VALUE_CHARS] + "…"
    return repr(value)


def _strip_or_none(value: str | None) -> str | None:
    if value is None:
        return None
    return value.strip() or None


# --- the batch loop ----------------------------------------------------------------------

def _has_new(conn: Connection) -> bool:
    e = m.alert_events
    return conn.execute(sa.select(e.c.id).where(e.c.status == "new").limit(1)).first() is not None


def _next_batch(conn: Connection, after: int) -> list[dict]:
    """The next new events by id (keyset paging: later batches never rescan earlier ones).
    On PostgreSQL the rows are locked so a plain UPDATE elsewhere cannot change a row
    between judging it and applying the verdict."""
    e = m.alert_events
    query = (
        sa.select(*_judged_columns(conn))
        .where(e.c.status == "new", e.c.id > after)
        .order_by(e.c.id)
        .limit(BATCH_SIZE)
    )
    if is_postgres(conn):
        query = query.with_for_update()
    return [dict(r._mapping) for r in conn.execute(query)]


def _judged_columns(conn: Connection) -> list[sa.ColumnElement]:
    """What the rules read (``validate_event``, ``normalise``): all a batch or one event loads."""
    e = m.alert_events
    return [e.c.id, e.c.title, e.c.summary, e.c.alert_type, e.c.region, e.c.url, e.c.severity, e.c.collapse_key,
            *_created_at_judged(conn)]


def created_at_inside(conn: Connection) -> sa.ColumnElement:
    """The event's created_at lies in the accepted range, as the database judges it."""
    e = m.alert_events
    if is_postgres(conn):
        return sa.and_(e.c.created_at >= CREATED_AT_FROM, e.c.created_at < CREATED_AT_UNTIL)
    utc_text = sa.func.datetime(e.c.created_at, type_=sa.Text)
    return sa.and_(utc_text >= f"{CREATED_AT_FROM:%Y-%m-%d %H:%M:%S}",
                   utc_text < f"{CREATED_AT_UNTIL:%Y-%m-%d %H:%M:%S}")


def _created_at_judged(conn: Connection) -> list[sa.ColumnElement]:
    """Whether created_at lies in the accepted range, and its text: judged by the
    database, which compares ``infinity`` and year 10000 correctly, where the driver would
    fail to read them. SQLite keeps text: ``datetime()`` reads it as UTC to the whole
    second (cut, not rounded, so the bounds stay exact), and is NULL — out of range — for
    text that is no time at all."""
    e = m.alert_events
    inside = created_at_inside(conn)
    return [sa.case((inside, True), else_=False).label("created_at_in_range"),
            sa.cast(e.c.created_at, sa.Text).label("created_at_text")]


def _verdict(row: dict) -> dict:
    reason = validate_event(row)
    if reason is not None:
        return {"id": row["id"], "reject_reason": reason,
                "alert_type": None, "title": None, "summary": None, "url": None, "collapse_key": None}
    return {"id": row["id"], "reject_reason": None, **normalise(row)}


def _apply(conn: Connection) -> tuple[int, int]:
    """Write the verdicts; returns (accepted, rejected). Rejected rows keep the
    producer's text verbatim, so the reason can be checked against what was sent."""
    e, v = m.alert_events, _verdicts
    same = sa.and_(e.c.id == v.c.id, e.c.status == "new")
    accepted = conn.execute(
        sa.update(e).where(same, v.c.reject_reason.is_(None))
        .values(status="ready", alert_type=v.c.alert_type, title=v.c.title, summary=v.c.summary, url=v.c.url,
                collapse_key=v.c.collapse_key)
    ).rowcount
    rejected = conn.execute(
        sa.update(e).where(same, v.c.reject_reason.is_not(None))
        .values(status="rejected", reject_reason=v.c.reject_reason)
    ).rowcount
    return accepted, rejected


# --- one event (the event-driven path, docs/deployment.md) -----------------------------------------

def intake_event(conn: Connection, event_id: int) -> str | None:
    """Judge one event if it is still ``new``: its new status (``ready`` or ``rejected``),
    or None when it was not new. Needs no phase lock: the row is locked (PostgreSQL) or
    the database has one writer (SQLite), and the update applies only to a ``new`` row,
    so this and a concurrent Phase A judge the event once between them."""
    e = m.alert_events
    query = sa.select(*_judged_columns(conn)).where(e.c.id == event_id, e.c.status == "new")
    if is_postgres(conn):
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    if row is None:
        return None
    reason = validate_event(row)
    values = {"status": "rejected", "reject_reason": reason} if reason else {"status": "ready", **normalise(row)}
    conn.execute(sa.update(e).where(e.c.id == event_id, e.c.status == "new").values(**values))
    return values["status"]
