"""Round trips to PostgreSQL per send on the Celery path, counted by PostgreSQL itself:
its statement log (``log_statement = 'all'`` for the test's database) lists every query
message a session sent — a simple query or an extended-protocol execute, BEGIN, COMMIT
and a pool's pre-ping included. A digest send is three (claim, load, record); a Telegram
send the same, plus one (the claim given back) only when it must wait for the limit.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from alerts.core.db import make_engine
from alerts.sending.ratelimit import LocalLimiter
from alerts.celery.worker import state as worker
from tests.integration.celery.test_tasks import (AFTER_WINDOW, app, broker, broker_url, celery_app,  # noqa: F401
                                                 clock, iso)
from tests.support.factories import add_delivery, add_digest, add_event, add_user

SENDS = 12


def server_log() -> Path:
    """The cluster's log file (Debian: /var/log/postgresql/postgresql-<version>-main.log)."""
    found = sorted(glob.glob("/var/log/postgresql/postgresql-*-main.log"), key=os.path.getmtime)
    if not found or not os.access(found[-1], os.R_OK):
        pytest.fail("no readable PostgreSQL server log under /var/log/postgresql (needed to count round trips)")
    return Path(found[-1])


class StatementLog:
    """The statements logged for one database from the moment ``mark()`` was called."""

    def __init__(self, pg_url: str):
        self.url = pg_url
        self.database = sa.engine.make_url(pg_url).database
        self.path = server_log()
        self.offset = 0

    def enable(self) -> None:
        engine = make_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{self.database}" SET log_statement = \'all\'')
        engine.dispose()

    def disable(self) -> None:
        engine = make_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{self.database}" RESET log_statement')
        engine.dispose()

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def statements(self) -> list[str]:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode("utf-8", "replace")
        ours = re.compile(rf"@{re.escape(self.database)} LOG:  (statement|execute [^:]*): (.*)")
        return [m.group(2) for line in text.splitlines() if (m := ours.search(line))]


@pytest.fixture
def statement_log(pg_url):
    log = StatementLog(pg_url)
    log.enable()
    yield log
    log.disable()


def test_a_digest_send_costs_three_round_trips(app, broker, pg_url, statement_log, smtp_server):  # noqa: F811
    with make_engine(pg_url).begin() as conn:
        digests = [add_digest(conn, add_user(conn), digest_key=f"rt-{n}") for n in range(SENDS + 1)]
    worker.configure(worker.settings)  # a fresh engine: its sessions start after log_statement was set
    send = app.tasks["alerts.send_digest"]
    assert send.apply((digests[0],), {"now": iso(AFTER_WINDOW)}).get() == "sent"  # warm: connects, checks schema

    statement_log.mark()
    for digest in digests[1:]:
        assert send.apply((digest,), {"now": iso(AFTER_WINDOW)}).get() == "sent"
    statements = statement_log.statements()

    assert len(statements) == 3 * SENDS, "\n".join(statements)
    assert not any(s.strip().upper() in ("BEGIN", "COMMIT", "SELECT 1") for s in statements)
    assert len(smtp_server.messages) == SENDS + 1


def test_an_email_send_pays_nothing_for_the_telegram_limit(app, broker, pg_url, statement_log,  # noqa: F811
                                                              smtp_server):
    """A bot token is configured (the app fixture points Telegram at the fake API) and a
    limiter is in place: email rows still cost three."""
    worker.configure(worker.settings, limiter=LocalLimiter())
    with make_engine(pg_url).begin() as conn:
        user = add_user(conn)
        rows = [add_delivery(conn, user, add_event(conn, status="fanned_out")) for _ in range(SENDS + 1)]
    send = app.tasks["alerts.send_delivery"]
    assert send.apply((rows[0],)).get() == "sent"

    statement_log.mark()
    assert [send.apply((row,)).get() for row in rows[1:]] == ["sent"] * SENDS

    assert len(statement_log.statements()) == 3 * SENDS


def test_a_telegram_send_costs_three_and_one_more_when_it_must_wait(app, broker, pg_url,  # noqa: F811
                                                                       statement_log, provider_api):
    worker.configure(worker.settings, limiter=LocalLimiter())
    with make_engine(pg_url).begin() as conn:
        users = [add_user(conn, telegram_chat_id=f"{700 + n}") for n in range(SENDS + 1)]
        rows = [add_delivery(conn, user, add_event(conn, status="fanned_out"), channel="telegram")
                for user in users]
        again = add_delivery(conn, users[-1], add_event(conn, status="fanned_out"), channel="telegram")
    send = app.tasks["alerts.send_delivery"]
    assert send.apply((rows[0],)).get() == "sent"

    statement_log.mark()
    assert [send.apply((row,)).get() for row in rows[1:]] == ["sent"] * SENDS
    assert len(statement_log.statements()) == 3 * SENDS

    statement_log.mark()  # the last chat's second is taken: this one waits, its claim given back
    assert send.apply((again,)).get() == "rate_limited"
    assert len(statement_log.statements()) == 3  # claim, load, release
