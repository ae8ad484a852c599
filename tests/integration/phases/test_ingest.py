"""Ingest: JSON Lines and single events into alert_events, on both databases."""
import json
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from alerts.phases import ingest as ingest_module
from alerts.core import tables as m
from alerts.phases.ingest import MalformedEvent, ingest_event, ingest_lines, parse_line
from alerts.phases.intake import run_phase_a
from tests.support.clock import NO_CHANNELS, clock_at

EVENT = {"event_key": "gas-nl-1", "alert_type": "price_spike", "region": "NL", "severity": 4,
         "title": "TTF day-ahead +18%"}


def line(**changes) -> str:
    return json.dumps({**EVENT, **changes}) + "\n"


def stored(engine) -> dict:
    with engine.connect() as conn:
        return {r.event_key: r for r in conn.execute(sa.select(m.alert_events).order_by(m.alert_events.c.id))}


@pytest.mark.parametrize("text,reason", [
    (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    (b'{"event_key": "a"} trailing', "invalid JSON: Extra data (column 20)"),
    (b"[1, 2]", "not a JSON object (got array)"),
    (b'"just a string"', "not a JSON object (got string)"),
    (b"null", "not a JSON object (got null)"),
    (b"caf\xe9", "invalid UTF-8 (byte 4 of the line)"),
    (line(status="ready").encode(), "unknown key 'status'"),
    (line(colour="red"), "unknown key 'colour'"),
    (json.dumps({k: v for k, v in EVENT.items() if k != "title"}), "missing key 'title'"),
    (json.dumps({k: v for k, v in EVENT.items() if k != "event_key"}), "missing key 'event_key'"),
    (json.dumps({k: v for k, v in EVENT.items() if k != "severity"}), "missing key 'severity'"),
    (json.dumps({k: v for k, v in EVENT.items() if k != "alert_type"}), "missing key 'alert_type'"),
    (line(severity="high"), "severity: must be a whole number (got string)"),
    (line(severity=4.5), "severity: must be a whole number (got 4.5)"),
    (line(severity=True), "severity: must be a whole number (got boolean)"),
    (line(severity=None), "severity: must be a whole number (got null)"),
    (line(severity=2**40), "severity: out of range"),
    (line(title=None), "title: must be a string (got null)"),
    (line(title=["a"]), "title: must be a string (got array)"),
    (line(region=5), "region: must be a string (got number)"),
    (line(url={"href": "x"}), "url: must be a string (got object)"),
    (line(event_key=""), "event_key: empty"),
    (line(event_key="k" * 201), "event_key: longer than 200 characters"),
    (line(title="a\u0000b"), "title: contains a NUL character"),
    (line(payload={"note": "a\u0000b"}), "payload: contains a NUL character"),
    ('{"event_key": "a\\ud800", "alert_type": "x", "title": "t", "severity": 1}',
     "event_key: contains an unpaired surrogate (invalid Unicode)"),
    (line(created_at="2026-05-12T09:00:00"), "created_at: needs a UTC offset, e.g. 2026-05-12T09:00:00+00:00"),
    (line(created_at="yesterday"), "created_at: not an ISO-8601 timestamp ('yesterday')"),
    (line(created_at=1715500000), "created_at: must be an ISO-8601 string (got number)"),
    (line(created_at="0001-01-01T00:00:00+05:00"), "created_at: out of range"),
    ('{"event_key": "a", "alert_type": "x", "title": "t", "severity": 1, "payload": %s}' % ("7" * 5000),
     "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion"),
    ('{"event_key": "a", "alert_type": "x", "title": "t", "severity": 1, "payload": %s}' % ("[" * 20000 + "]" * 20000),
     "invalid JSON: nested too deeply"),
    ('{"event_key": "a", "event_key": "b", "alert_type": "x", "title": "t", "severity": 1}',
     "repeated key 'event_key'"),
    ('{"event_key": "a", "alert_type": "x", "title": "t", "severity": NaN}',
     "invalid JSON: NaN is not a JSON number"),
    ('{"event_key": "a", "alert_type": "x", "title": "t", "severity": 1, "payload": {"x": 1e999}}',
     "invalid JSON: number 1e999 is out of range"),
])
def test_a_malformed_line_is_refused_with_a_reason(text, reason):
    with pytest.raises(MalformedEvent) as caught:
        parse_line(text)
    assert str(caught.value) == reason


@pytest.mark.parametrize("text", ["", "   \n", b"\r\n"])
def test_a_blank_line_is_nothing(text):
    assert parse_line(text) is None


def test_a_byte_order_mark_on_the_first_line_is_ignored():
    assert parse_line("\ufeff" + line(), first=True)["event_key"] == "gas-nl-1"


def test_malformed_lines_are_reported_by_number_and_the_good_lines_stored(db, engine):
    lines = [
        line(event_key="a").encode(),
        b"{oops\n",
        b"\n",
        line(event_key="b", severity="high").encode(),
        b"\xff\xfe garbage\n",
        line(event_key="c").encode(),
    ]

    report = ingest_lines(db, lines)

    assert (report.stored, report.duplicates) == (2, 0)
    assert [n for n, _ in report.errors] == [2, 4, 5]
    assert "severity" in report.errors[1][1] and "UTF-8" in report.errors[2][1]
    assert list(stored(engine)) == ["a", "c"]


def test_a_repeated_event_key_is_a_no_op_and_the_first_row_wins(db, engine):
    first = ingest_lines(db, [line(title="first"), line(title="second in the same file")])
    again = ingest_lines(db, [line(title="a later file")])

    assert (first.stored, first.duplicates, first.errors) == (1, 1, [])
    assert (again.stored, again.duplicates) == (0, 1)
    assert stored(engine)["gas-nl-1"].title == "first"


def test_duplicates_across_batches_count_once(db, engine, monkeypatch):
    monkeypatch.setattr(ingest_module, "BATCH_SIZE", 4)
    lines = [line(event_key=f"k{i % 7}", title=f"copy {i}") for i in range(20)]

    report = ingest_lines(db, lines)

    assert (report.stored, report.duplicates) == (7, 13)
    assert {k: r.title for k, r in stored(engine).items()} == {f"k{i}": f"copy {i}" for i in range(7)}


def test_values_phase_a_judges_are_stored_and_then_rejected_not_lost(db, engine, now, settings):
    report = ingest_lines(db, [
        line(event_key="sev", severity=9),
        line(event_key="title", title=""),
        line(event_key="url", url="javascript:alert(1)"),
        line(event_key="type", alert_type="Price Spike"),
    ])
    assert (report.stored, report.errors) == (4, [])

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 0, "rejected": 4}
    reasons = {k: r.reject_reason.split(":")[0] for k, r in stored(engine).items()}
    assert reasons == {"sev": "severity", "title": "title", "url": "url", "type": "alert_type"}


def test_hostile_content_is_stored_verbatim(db, engine):
    title = "<script>alert('x')</script> & \"q\" \u202e 🔥"
    payload = {"html": "<img src=x onerror=alert(1)>", "nested": [1, {"k": "'; DROP TABLE users; --"}]}

    ingest_lines(db, [line(title=title, summary="  spaced  ", payload=payload)])

    row = stored(engine)["gas-nl-1"]
    assert (row.title, row.summary, row.payload, row.status) == (title, "  spaced  ", payload, "new")


def test_optional_columns_default_when_absent(db, engine):
    ingest_lines(db, [json.dumps(EVENT)])

    row = stored(engine)["gas-nl-1"]
    assert (row.summary, row.url, row.payload) == (None, None, None)
    assert row.created_at is not None and row.created_at.tzinfo is not None


def test_created_at_with_an_offset_is_stored_in_utc(db, engine):
    ingest_lines(db, [line(event_key="a", created_at="2026-05-12T11:30:00+02:00"),
                      line(event_key="b", created_at="2026-05-12T09:30:00Z", payload={"x": 1})])

    rows = stored(engine)
    expected = datetime(2026, 5, 12, 9, 30, tzinfo=timezone.utc)
    assert rows["a"].created_at == rows["b"].created_at == expected
    assert rows["b"].payload == {"x": 1}


def test_ingest_event_stores_once_and_reports_the_duplicate(db, engine):
    assert ingest_event(db, EVENT) is True
    assert ingest_event(db, {**EVENT, "title": "changed"}) is False
    assert stored(engine)["gas-nl-1"].title == EVENT["title"]


def test_ingest_event_refuses_what_cannot_be_stored(db, engine):
    with pytest.raises(MalformedEvent, match="unknown key 'status'"):
        ingest_event(db, {**EVENT, "status": "ready"})
    assert stored(engine) == {}


def test_ingest_lines_and_ingest_event_accept_a_collapse_key(db, engine):
    ingest_lines(db, [line(event_key="a", collapse_key="nord-stream-2026-05")])
    ingest_event(db, {**EVENT, "event_key": "b", "collapse_key": "nord-stream-2026-05"})
    ingest_event(db, {**EVENT, "event_key": "c"})

    rows = stored(engine)
    assert {k: r.collapse_key for k, r in rows.items()} == {
        "a": "nord-stream-2026-05", "b": "nord-stream-2026-05", "c": None}


def test_a_long_collapse_key_is_stored_for_phase_a_to_reject(db, engine):
    assert ingest_lines(db, [line(event_key="long", collapse_key="k" * 500)]).errors == []
    assert stored(engine)["long"].collapse_key == "k" * 500


def test_times_regions_and_types_phase_a_refuses_are_stored_by_both_ways_in_then_rejected(db, engine, now, settings):
    """What fits the columns is stored, however wrong: Phase A rejects it with a reason."""
    report = ingest_lines(db, [
        line(event_key="go-zero", created_at="0001-01-01T00:00:00Z"),
        line(event_key="far", created_at="9999-12-31T23:59:59+00:00"),
        line(event_key="region", region="R" * 5000),
        line(event_key="tab", region="North\tSea"),
        line(event_key="type", alert_type="t" * 65),
    ])
    assert (report.stored, report.errors) == (5, [])
    assert ingest_event(db, {**EVENT, "event_key": "event", "region": "line\nbreak",
                             "created_at": "1999-12-31T23:59:59+00:00"}) is True

    assert run_phase_a(db, clock_at(now), settings, NO_CHANNELS) == {"accepted": 0, "rejected": 6}
    reasons = {k: r.reject_reason for k, r in stored(engine).items()}
    assert {k: reason.split(":")[0] for k, reason in reasons.items()} == {
        "go-zero": "created_at", "far": "created_at", "region": "region", "tab": "region", "type": "alert_type",
        "event": "region"}
    assert "; created_at: " in reasons["event"], "every problem is named"


def test_a_payload_nested_too_deeply_to_check_is_refused_not_a_crash(db, engine):
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(MalformedEvent, match="payload: nested too deeply"):
        ingest_event(db, {**EVENT, "payload": deep})
    assert stored(engine) == {}
