"""Store producers' events: JSON Lines (``alerts ingest FILE|-``) and single events (the
Celery task ``alerts.ingest_event``).

Ingest checks only what it takes to store a row: a JSON object with known keys and
values of the right JSON type. Whether the values make a good event (a title, severity
1..5, a safe url) is Phase A's call: such events are stored and then rejected with a
reason, so nothing a producer sent is lost (docs/intake.md). A repeated ``event_key`` —
in the same file or already stored — is a no-op: the first row wins.

Size is the one thing ingest bounds itself: a line (or a single event) over
``MAX_EVENT_BYTES`` is refused before it is decoded, and a file's lines are read with
that limit, so one giant line can neither exhaust memory nor stop the other lines.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from typing import Iterable, Iterator

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.core.db import Database

BATCH_SIZE = 1000  # lines per transaction: a huge file streams, a crash keeps what was committed
# No size is promised; an event is a title (≤ 500 chars), a summary (≤ 2000), a url and a
# small payload, so 64 KiB is generous and still keeps a batch well under 100 MB.
MAX_EVENT_BYTES = 64 * 1024
_SKIP_CHUNK = 1024 * 1024  # how much of an oversized line is read (and dropped) at a time
MAX_EVENT_KEY_CHARS = 200  # keeps the UNIQUE index entry far below PostgreSQL's ~2.7 kB limit
INT_MIN, INT_MAX = -(2**31), 2**31 - 1  # the severity column is a 32-bit integer

REQUIRED_TEXT = ("event_key", "alert_type", "title")
OPTIONAL_TEXT = ("region", "summary", "url", "collapse_key")  # collapse_key: §10.3; Phase A checks its length
COLUMNS = frozenset(REQUIRED_TEXT + OPTIONAL_TEXT + ("severity", "payload", "created_at"))


class MalformedEvent(ValueError):
    """The input cannot be stored as an event; the message says why."""


@dataclass
class IngestReport:
    stored: int = 0
    duplicates: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def ingest_lines(db: Database, lines: Iterable[str | bytes]) -> IngestReport:
    """Store one event per line; a malformed line is reported and skipped, blank lines
    are ignored, the other lines are stored in batches. ``lines`` is any iterable of
    lines, or an open file (read line by line with a size limit)."""
    report = IngestReport()
    if hasattr(lines, "readline"):
        lines = bounded_lines(lines)
    parsed = _parse_all(enumerate(lines, start=1), report)
    while batch := list(islice(parsed, BATCH_SIZE)):
        _store(db, batch, report)
    return report


def ingest_event(db: Database, event: dict) -> bool:
    """Store one event; True if stored, False if its event_key was already there.
    Raises MalformedEvent when it cannot be stored."""
    row = event_row(event)
    size = len(json.dumps(event, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
    if size > MAX_EVENT_BYTES:
        raise MalformedEvent(_too_long(size))
    report = IngestReport()
    _store(db, [row], report)
    return report.stored == 1


@dataclass(frozen=True)
class OversizedLine:
    """Stands in for a line longer than the limit, which was read past, not kept."""

    size: int  # bytes (characters, for a text stream), line break excluded


def bounded_lines(stream, limit: int = MAX_EVENT_BYTES) -> Iterator[bytes | str | OversizedLine]:
    """The lines of an open file, never holding much more than ``limit`` of one line in
    memory: a longer line is read past in chunks and yielded as an ``OversizedLine``.
    (``parse_line`` makes the exact check; this only has to bound the memory.)"""
    while True:
        line = stream.readline(limit + 2)  # room for the content plus "\r\n"
        if not line:
            return
        newline = "\n" if isinstance(line, str) else b"\n"
        if len(line) < limit + 2 or line.endswith(newline):
            yield line
            continue
        size = len(line)
        while not line.endswith(newline):
            line = stream.readline(_SKIP_CHUNK)
            size += len(line)
            if not line:
                break
        yield OversizedLine(size - _line_break_length(line))


def _line_break_length(line: str | bytes) -> int:
    return len(line) - len(line.rstrip(b"\r\n" if isinstance(line, bytes) else "\r\n"))


def parse_line(line: str | bytes | OversizedLine, *, first: bool = False) -> dict | None:
    """The row for one JSON Lines line, None for a blank line; raises MalformedEvent."""
    if isinstance(line, OversizedLine):
        raise MalformedEvent(_too_long(line.size))
    content = line.rstrip(b"\r\n") if isinstance(line, bytes) else line.rstrip("\r\n").encode("utf-8", "surrogatepass")
    if len(content) > MAX_EVENT_BYTES:
        raise MalformedEvent(_too_long(len(content)))
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedEvent(f"invalid UTF-8 (byte {exc.start + 1} of the line)") from None
    if first:
        line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line, object_pairs_hook=_no_repeated_keys,
                         parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise MalformedEvent(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except MalformedEvent:
        raise  # from the hooks: a repeated key, NaN, 1e999
    except ValueError as exc:  # an integer of more digits than Python converts (4,300)
        raise MalformedEvent(f"invalid JSON: {str(exc).split(':')[0]}") from None
    except RecursionError:
        raise MalformedEvent("invalid JSON: nested too deeply") from None
    return event_row(obj)


def event_row(obj) -> dict:
    """Check a decoded event's keys and types; returns the row to insert."""
    try:
        return _event_row(obj)
    except RecursionError:  # a payload nested thousands deep, handed over already decoded
        raise MalformedEvent("payload: nested too deeply") from None


def _event_row(obj) -> dict:
    if not isinstance(obj, dict):
        raise MalformedEvent(f"not a JSON object (got {_json_type(obj)})")
    unknown = sorted(obj.keys() - COLUMNS)
    if unknown:  # also how a producer learns it may not set status or id
        raise MalformedEvent(f"unknown key {_quoted(unknown[0])}")
    for key in REQUIRED_TEXT + ("severity",):
        if key not in obj:
            raise MalformedEvent(f"missing key {key!r}")
    for key in COLUMNS & obj.keys():
        _check_storable_text(key, obj[key])
    row = {}
    for key in REQUIRED_TEXT:
        row[key] = _text(key, obj[key])
    for key in OPTIONAL_TEXT:
        row[key] = None if obj.get(key) is None else _text(key, obj[key])
    if not row["event_key"].strip():
        raise MalformedEvent("event_key: empty")
    if len(row["event_key"]) > MAX_EVENT_KEY_CHARS:
        raise MalformedEvent(f"event_key: longer than {MAX_EVENT_KEY_CHARS} characters")
    row["severity"] = _severity(obj["severity"])
    # Absent ⇒ the column's default: SQL NULL payload, created_at = the database's now().
    if obj.get("payload") is not None:
        row["payload"] = obj["payload"]
    if obj.get("created_at") is not None:
        row["created_at"] = _timestamp(obj["created_at"])
    return row


# --- parsing helpers --------------------------------------------------------------------

def _parse_all(numbered: Iterable[tuple[int, str | bytes | OversizedLine]], report: IngestReport) -> Iterator[dict]:
    for number, line in numbered:
        try:
            row = parse_line(line, first=number == 1)
        except MalformedEvent as exc:
            report.errors.append((number, str(exc)))
            continue
        if row is not None:
            yield row


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON lets a key repeat and Python keeps the last: refuse instead of guessing."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise MalformedEvent(f"repeated key {_quoted(key)}")
        obj[key] = value
    return obj


def _no_constant(name: str):
    raise MalformedEvent(f"invalid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: PostgreSQL's JSON cannot hold it
        raise MalformedEvent(f"invalid JSON: number {text[:20]} is out of range")
    return value


def _check_storable_text(key: str, value) -> None:
    """Neither PostgreSQL text nor JSONB can hold NUL, and an unpaired surrogate (from
    a "\\ud800" escape) is not encodable: refuse the line rather than fail its batch."""
    for text in _strings(value):
        if "\x00" in text:
            raise MalformedEvent(f"{key}: contains a NUL character")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedEvent(f"{key}: contains an unpaired surrogate (invalid Unicode)") from None


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _text(key: str, value) -> str:
    if not isinstance(value, str):
        raise MalformedEvent(f"{key}: must be a string (got {_json_type(value)})")
    return value


def _severity(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        got = repr(value) if isinstance(value, float) else _json_type(value)
        raise MalformedEvent(f"severity: must be a whole number (got {got})")
    if not INT_MIN <= value <= INT_MAX:
        raise MalformedEvent("severity: out of range")
    return value  # 9 or 0 is stored: Phase A rejects it with a reason


def _timestamp(value) -> datetime:
    if not isinstance(value, str):
        raise MalformedEvent(f"created_at: must be an ISO-8601 string (got {_json_type(value)})")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedEvent(f"created_at: not an ISO-8601 timestamp ({_quoted(value)})") from None
    if parsed.tzinfo is None:
        raise MalformedEvent("created_at: needs a UTC offset, e.g. 2026-05-12T09:00:00+00:00")
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:
        raise MalformedEvent("created_at: out of range") from None


def _json_type(value) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number"),
                       (dict, "object"), (list, "array")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _too_long(size: int) -> str:
    return f"longer than {MAX_EVENT_BYTES} bytes ({size} bytes); events must be smaller"


def _quoted(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --- storing ----------------------------------------------------------------------------

def _store(db: Database, rows: list[dict], report: IngestReport) -> None:
    """Insert one batch in one transaction. A key repeated inside the batch is dropped
    here (the first row wins); a key already stored is skipped by ON CONFLICT."""
    unique: dict[str, dict] = {}
    for row in rows:
        unique.setdefault(row["event_key"], row)
    stored = 0
    with db.transaction() as conn:
        for group in _same_columns(unique.values()):
            stored += len(conn.execute(_insert(conn), group).all())
    report.stored += stored
    report.duplicates += len(rows) - stored


def _same_columns(rows: Iterable[dict]) -> list[list[dict]]:
    """One executemany needs one column list: group rows by which optional columns
    they set (at most four groups)."""
    groups: dict[frozenset, list[dict]] = {}
    for row in rows:
        groups.setdefault(frozenset(row), []).append(row)
    return list(groups.values())


def _insert(conn: Connection) -> sa.Insert:
    e = m.alert_events
    insert = postgresql.insert(e) if conn.dialect.name == "postgresql" else sqlite.insert(e)
    return insert.on_conflict_do_nothing(index_elements=[e.c.event_key]).returning(e.c.id)
