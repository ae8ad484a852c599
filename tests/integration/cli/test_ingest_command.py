"""``alerts ingest``: never a silent success — exit 1 when any line was malformed, the
other lines stored, each bad line named by its number."""
from __future__ import annotations

import json

import sqlalchemy as sa
from click.testing import CliRunner

from alerts.cli import cli
from alerts.core import tables as m

EVENT = {"event_key": "gas-nl-1", "alert_type": "price_spike", "region": "NL", "severity": 4,
         "title": "TTF day-ahead +18%"}


def ingest(db_url: str, text: str, *args: str):
    return CliRunner().invoke(cli, ["ingest", "-", *args], input=text.encode(), env={"DATABASE_URL": db_url},
                              catch_exceptions=False)


def keys(engine) -> list[str]:
    with engine.connect() as conn:
        return conn.execute(sa.select(m.alert_events.c.event_key).order_by(m.alert_events.c.id)).scalars().all()


def test_a_file_of_good_lines_exits_0(db_url, engine):
    result = ingest(db_url, json.dumps(EVENT) + "\n" + json.dumps({**EVENT, "event_key": "b"}) + "\n")

    assert result.exit_code == 0
    assert result.stdout == "stored 2, duplicates 0, malformed 0\n"
    assert keys(engine) == ["gas-nl-1", "b"]


def test_malformed_lines_exit_1_naming_their_numbers_and_the_others_are_stored(db_url, engine):
    lines = [json.dumps(EVENT), "{oops", json.dumps({**EVENT, "event_key": "c", "severity": "high"}),
             json.dumps({**EVENT, "event_key": "d"})]

    result = ingest(db_url, "\n".join(lines) + "\n")

    assert result.exit_code == 1
    assert result.stdout == "stored 2, duplicates 0, malformed 2\n"
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["line 2", "line 3"]
    assert keys(engine) == ["gas-nl-1", "d"]


def test_json_output_lists_the_malformed_lines_and_still_exits_1(db_url):
    result = ingest(db_url, json.dumps(EVENT) + "\n[1]\n", "--json")

    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"stored": 1, "duplicates": 0,
                                         "errors": [{"line": 2, "reason": "not a JSON object (got array)"}]}


def test_events_phase_a_will_reject_are_stored_and_exit_0(db_url, engine):
    """A wrong value that fits the columns is not malformed: Phase A rejects it with a reason."""
    result = ingest(db_url, json.dumps({**EVENT, "created_at": "0001-01-01T00:00:00Z", "region": "x" * 500}) + "\n")

    assert result.exit_code == 0
    assert keys(engine) == ["gas-nl-1"]
