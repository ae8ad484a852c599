"""``alerts check``: exit 0 and ``ok`` when nothing is stuck, else exit 1 and one line per
kind of problem (SPEC §12.4)."""
from __future__ import annotations

import json
from datetime import timedelta

from click.testing import CliRunner

from alerts.cli import cli
from tests.support.factories import WINDOW_END, add_delivery, add_digest, add_event, add_user

NOW = WINDOW_END + timedelta(hours=1)
LONG_AGO = NOW - timedelta(seconds=1000)  # due for longer than the default 900 s
LATELY = NOW - timedelta(seconds=100)


def check(db_url, *args, env=None):
    return CliRunner().invoke(cli, ["check", "--now", NOW.isoformat(), *args],
                              env={"DATABASE_URL": db_url, **(env or {})}, catch_exceptions=False)


def test_an_empty_database_is_ok(db_url):
    result = check(db_url)
    assert (result.exit_code, result.output) == (0, "ok\n")


def test_rows_due_lately_held_or_sent_are_ok(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), created_at=LATELY)
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO, status="sent")
        # Held by quiet hours (or waiting for a retry): not due before its next_retry_at.
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO, next_retry_at=NOW + timedelta(hours=6))
        # A digest delivery waits for its digest, not for a send.
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO, delivery_kind="digest")
        add_digest(conn, user, next_retry_at=LATELY)
        add_delivery(conn, user, add_event(conn), status="sending", claimed_at=NOW - timedelta(seconds=599))
    result = check(db_url)
    assert (result.exit_code, result.output) == (0, "ok\n")


def test_an_instant_delivery_due_longer_than_max_age_is_a_problem(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), created_at=LONG_AGO)
        add_delivery(conn, user, add_event(conn), created_at=NOW - timedelta(hours=2), next_retry_at=LONG_AGO)
    result = check(db_url)
    assert result.exit_code == 1
    assert result.output == "instant deliveries: 2 queued and due for more than 900s (oldest due 1000s ago)\n"
    assert check(db_url, "--max-age", "1001").output == "ok\n"


def test_a_digest_due_longer_than_max_age_is_a_problem(db, db_url):
    with db.transaction() as conn:
        add_digest(conn, add_user(conn), next_retry_at=NOW - timedelta(seconds=3600))
    result = check(db_url, "--max-age", "60")
    assert result.exit_code == 1
    assert result.output == "digests: 1 queued and due for more than 60s (oldest due 3600s ago)\n"


def test_a_row_in_sending_past_the_lease_is_a_stuck_send(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        add_delivery(conn, user, add_event(conn), status="sending", claimed_at=NOW - timedelta(seconds=700))
        add_digest(conn, user, status="sending", claimed_at=NOW - timedelta(seconds=601))
    result = check(db_url, env={"ALERTS_SENDING_LEASE_SECONDS": "600"})
    assert result.exit_code == 1
    assert result.output == "stuck sends: 2 row(s) in sending past the 600s lease (oldest claimed 700s ago)\n"


def test_each_kind_of_problem_is_one_line_and_json_lists_them(db, db_url):
    with db.transaction() as conn:
        user = add_user(conn)
        for _ in range(3):
            add_delivery(conn, user, add_event(conn), created_at=LONG_AGO)
        add_digest(conn, user, next_retry_at=LONG_AGO)
        add_delivery(conn, user, add_event(conn), status="sending", claimed_at=LONG_AGO)
    text = check(db_url)
    assert text.exit_code == 1
    assert [line.split(":")[0] for line in text.output.splitlines()] == [
        "instant deliveries", "digests", "stuck sends"]

    result = check(db_url, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output) == {
        "ok": False, "max_age_seconds": 900, "lease_seconds": 600,
        "problems": [{"kind": "instant", "count": 3, "oldest_seconds": 1000},
                     {"kind": "digests", "count": 1, "oldest_seconds": 1000},
                     {"kind": "stuck_sends", "count": 1, "oldest_seconds": 1000}]}


def test_json_when_healthy(db_url):
    result = check(db_url, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == {"ok": True, "max_age_seconds": 900, "lease_seconds": 600, "problems": []}


def test_a_bad_max_age_exits_2_naming_it(db_url):
    for bad in ("0", "-5", "ten", "1.5", str(10 ** 12)):
        result = check(db_url, "--max-age", bad)
        assert result.exit_code == 2, bad
        assert "--max-age" in result.output


def test_a_bad_now_exits_2_naming_it(db_url):
    result = CliRunner().invoke(cli, ["check", "--now", "yesterday"], env={"DATABASE_URL": db_url})
    assert result.exit_code == 2
    assert "--now" in result.output
