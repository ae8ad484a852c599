"""alerts.db.Script: statements sent to PostgreSQL in one round trip, prepared once per
connection, with a plain-SQL fallback where prepared statements do not stick (a
transaction-pooling PgBouncer) — and the send tasks' claim-and-load script built on it."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from alerts import models as m
from alerts.channels.registry import build_channels
from alerts.config import Settings
from alerts.db import Script, make_engine
from alerts.phases.send import DIGEST, Autocommit, _claim_and_load_one, _claim_and_load_script
from tests.factories import WINDOW_END, add_digest, add_user

AFTER_WINDOW = datetime(2026, 5, 13, 0, 5, tzinfo=timezone.utc)


@pytest.fixture
def engine(pg_url):
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def autocommit(engine):
    statements = Autocommit(engine)
    yield statements
    statements.close()


def rename_script(name: str = "rename") -> Script:
    """Rename one user (a fixed value and a parameter in one statement), then read it back."""
    u = m.users
    return Script(name,
                  sa.update(u).where(u.c.id == sa.bindparam("user_id")).values(email=sa.bindparam("email"),
                                                                              plan="pro"),
                  sa.select(u.c.id, u.c.email, u.c.plan, u.c.created_at).where(u.c.id == sa.bindparam("user_id")))


def file_outbox_settings(engine, tmp_path) -> Settings:
    return Settings.from_env({"DATABASE_URL": engine.url.render_as_string(hide_password=False),
                              "ALERTS_EMAIL_BACKEND": "file", "ALERTS_OUTBOX_DIR": str(tmp_path)})


def prepared_names(conn) -> set[str]:
    return set(conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars())


def test_a_script_runs_all_its_statements_in_one_call_and_returns_the_last_ones_rows(engine, autocommit):
    with engine.begin() as conn:
        user = add_user(conn, email="old@example.com")

    rows, count = autocommit(lambda conn: rename_script().run(conn, {"user_id": user, "email": "new@example.com"}))

    assert count == 1
    assert [(r["id"], r["email"], r["plan"]) for r in rows] == [(user, "new@example.com", "pro")]
    assert rows[0]["created_at"].tzinfo == timezone.utc  # typed like the column: UTCDateTime


def test_a_script_is_prepared_once_per_connection_and_executed_after(engine, autocommit):
    with engine.begin() as conn:
        user = add_user(conn)
    script = rename_script("prepared_once")

    for n in range(3):
        autocommit(lambda conn: script.run(conn, {"user_id": user, "email": f"u{n}@example.com"}))
    names = autocommit(prepared_names)
    calls = autocommit(lambda conn: conn.exec_driver_sql(
        "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements "
        "WHERE name LIKE 'alerts_prepared_once_%%'").all())

    assert {"alerts_prepared_once_0", "alerts_prepared_once_1"} <= names
    assert {name: plans for name, plans in calls} == {"alerts_prepared_once_0": 3, "alerts_prepared_once_1": 3}


def test_a_script_goes_plain_on_a_connection_that_lost_its_prepared_statements(engine, autocommit):
    """What a transaction-pooling PgBouncer does: the next round trip lands on a server
    connection that never saw the PREPARE."""
    with engine.begin() as conn:
        user = add_user(conn)
    script = rename_script("lost")
    autocommit(lambda conn: script.run(conn, {"user_id": user, "email": "a@example.com"}))
    autocommit(lambda conn: conn.exec_driver_sql("DEALLOCATE ALL"))

    rows, _ = autocommit(lambda conn: script.run(conn, {"user_id": user, "email": "b@example.com"}))
    again, _ = autocommit(lambda conn: script.run(conn, {"user_id": user, "email": "c@example.com"}))

    assert [r["email"] for r in rows + again] == ["b@example.com", "c@example.com"]
    assert not any(name.startswith("alerts_lost_") for name in autocommit(prepared_names))  # stays plain


def test_a_script_goes_plain_where_its_statement_name_is_already_taken(engine, autocommit):
    """A pooled server connection that an earlier client prepared the name on."""
    with engine.begin() as conn:
        user = add_user(conn)
    autocommit(lambda conn: conn.exec_driver_sql("PREPARE alerts_taken_0 AS SELECT 1"))

    rows, count = autocommit(lambda conn: rename_script("taken").run(conn, {"user_id": user,
                                                                            "email": "x@example.com"}))

    assert count == 1 and rows[0]["email"] == "x@example.com"


def test_a_failing_script_changes_nothing(engine, autocommit):
    """All or nothing: the update is undone when the read after it fails."""
    with engine.begin() as conn:
        user = add_user(conn, email="kept@example.com")
    u = m.users
    failing = Script("failing", sa.update(u).where(u.c.id == sa.bindparam("user_id")).values(email="lost@example.com"),
                     sa.select(sa.cast(sa.bindparam("not_a_number", type_=sa.Text), sa.Integer)))

    with pytest.raises(sa.exc.DataError):
        autocommit(lambda conn: failing.run(conn, {"user_id": user, "not_a_number": "x"}))

    with engine.connect() as conn:
        assert conn.execute(sa.select(u.c.email).where(u.c.id == user)).scalar_one() == "kept@example.com"


def test_claim_and_load_gets_the_whole_digest_and_claims_it_once(engine, autocommit, tmp_path):
    with engine.begin() as conn:
        digest = add_digest(conn, add_user(conn, email="reader@example.com"), events=3)
    settings = file_outbox_settings(engine, tmp_path)
    channels = build_channels(settings)

    (job,) = _claim_and_load_one(autocommit, DIGEST, digest, AFTER_WINDOW, settings, channels)
    second = _claim_and_load_one(autocommit, DIGEST, digest, AFTER_WINDOW, settings, channels)

    assert (job.id, job.attempts, job.recipient) == (digest, 1, "reader@example.com")
    assert "(3 alerts)" in job.message.subject
    assert second == []  # the row is ours: a second claim, here or anywhere, gets nothing
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.user_alert_digests.c.status)
                            .where(m.user_alert_digests.c.id == digest)).scalar_one() == "sending"


def test_claim_and_load_claims_nothing_before_the_digest_is_due(engine, autocommit):
    with engine.begin() as conn:
        digest = add_digest(conn, add_user(conn))
    settings = Settings.from_env({"DATABASE_URL": str(engine.url)})

    assert _claim_and_load_one(autocommit, DIGEST, digest, WINDOW_END.replace(hour=WINDOW_END.hour - 1),
                               settings, build_channels(settings)) == []


def test_claim_and_load_reads_under_read_committed_whatever_the_sessions_default(engine, autocommit, tmp_path):
    """Under a REPEATABLE READ default the load would share the claim's snapshot and
    could miss items Phase D committed in between; the script states READ COMMITTED."""
    autocommit(lambda conn: conn.exec_driver_sql(
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
    probe = Script("isolation", sa.select(sa.func.current_setting("transaction_isolation").label("level")),
                   preamble=_claim_and_load_script(DIGEST).preamble)
    with engine.begin() as conn:
        digest = add_digest(conn, add_user(conn), events=2)
    settings = file_outbox_settings(engine, tmp_path)

    (level,), _ = autocommit(lambda conn: probe.run(conn, {}))
    (job,) = _claim_and_load_one(autocommit, DIGEST, digest, AFTER_WINDOW, settings, build_channels(settings))

    assert autocommit(lambda conn: conn.exec_driver_sql("SHOW default_transaction_isolation").scalar()) == \
        "repeatable read"
    assert level == {"level": "read committed"}
    assert "(2 alerts)" in job.message.subject
