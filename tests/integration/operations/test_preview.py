"""`alerts preview --user ID --date D` (docs/policy.md): the daily window that starts on local
date D at the user's send time, as it will be sent."""
from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from click.testing import CliRunner

from alerts.core import tables as m
from alerts.cli import cli
from alerts.phases.digests import run_phase_d
from tests.support.clock import NO_CHANNELS, clock_at
from tests.support.factories import add_delivery, add_event, add_user

UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def invoke(db_url, *args, env=None):
    return CliRunner().invoke(cli, list(args), env={"DATABASE_URL": db_url, **(env or {})}, catch_exceptions=False)


def dump(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns or t.c))]
                for t in m.metadata.sorted_tables}


def seed(db, **user_cols) -> int:
    """A user in Amsterdam with digest events around two 07:30s (CEST: 05:30 UTC)."""
    with db.transaction() as conn:
        user = add_user(conn, timezone="Europe/Amsterdam", **user_cols)
        for at, title in ((utc(2026, 5, 12, 5, 29), "Before the window"), (utc(2026, 5, 12, 5, 30), "First in"),
                          (utc(2026, 5, 12, 20), "Evening"), (utc(2026, 5, 13, 5, 29), "Last in"),
                          (utc(2026, 5, 13, 5, 30), "Next window")):
            add_delivery(conn, user, add_event(conn, title=title, status="fanned_out", created_at=at),
                         delivery_kind="digest")
    return user


def test_preview_shows_the_window_from_the_users_send_time_and_when_it_is_due(db_url, db, engine):
    user = seed(db, digest_send_time="07:30")
    before = dump(engine)

    result = invoke(db_url, "preview", "--user", str(user), "--date", "2026-05-12", "--channel", "email")

    assert result.exit_code == 0, result.output
    out = result.output
    assert "3 item(s), window 2026-05-12 05:30 – 2026-05-13 05:30 UTC" in out
    assert "send time 07:30 Europe/Amsterdam: due Wed 13 May 2026 07:30 Europe/Amsterdam (2026-05-13 05:30 UTC)" in out
    assert "Subject: EnergyRiskIQ daily digest — 2026-05-12 (3 alerts)" in out
    assert "Tue 12 May 07:30 – Wed 13 May 07:30 Europe/Amsterdam" in out
    assert all(t in out for t in ("First in", "Evening", "Last in"))
    assert "Before the window" not in out and "Next window" not in out
    assert dump(engine) == before


def test_preview_uses_alerts_digest_send_time_for_users_without_their_own(db_url, db):
    user = seed(db)
    result = invoke(db_url, "preview", "--user", str(user), "--date", "2026-05-12", "--channel", "email",
                    env={"ALERTS_DIGEST_SEND_TIME": "07:30"})
    assert result.exit_code == 0, result.output
    assert "send time 07:30 Europe/Amsterdam" in result.output and "3 item(s)" in result.output


def test_preview_of_a_window_is_what_phase_d_then_builds_and_sends(db_url, db, settings):
    user = seed(db, digest_send_time="07:30")
    unbuilt = invoke(db_url, "preview", "--user", str(user), "--date", "2026-05-12", "--channel", "email").output
    run_phase_d(db, clock_at(utc(2026, 5, 13, 6)), settings, NO_CHANNELS)
    with db.engine.connect() as conn:
        digest_id = conn.execute(sa.select(m.user_alert_digests.c.id)
                                 .where(m.user_alert_digests.c.window_start == utc(2026, 5, 12, 5, 30))).scalar_one()
    built = invoke(db_url, "preview", "--digest", str(digest_id)).output
    assert "queued, due Wed 13 May 2026 07:30 Europe/Amsterdam (2026-05-13 05:30 UTC)" in built

    def body(output: str) -> list[str]:  # the message, without the ids that name the preview itself
        lines = output.split("=== email ===", 1)[1].splitlines()
        return [line for line in lines if not line.startswith(("Message-ID:", "X-Alerts-Digest-Key:"))]

    assert body(unbuilt) == body(built)
    assert sum(title in "\n".join(body(built)) for title in ("First in", "Evening", "Last in")) == 3
