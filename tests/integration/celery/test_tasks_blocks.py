"""Destination health (docs/policy.md) through the Celery send tasks (``send_delivery``,
``send_digest``) on PostgreSQL: the same send path as Phase C, one row per task."""
from __future__ import annotations

import sqlalchemy as sa

from alerts.core import tables as m
from tests.support.factories import WINDOW_END, add_digest
from tests.support.fakes.provider_api import BLOCKED, UPGRADED
from tests.integration.sending.test_blocks import CHAT, GONE_EMAIL, NEW_CHAT, attempts_to, instant, seed_user
from tests.integration.celery.test_tasks import app, broker, broker_url, celery_app, clock, iso  # noqa: F401 (fixtures)


# --- the Celery send tasks (PostgreSQL) --------------------------------------------------------------

def test_the_send_task_records_the_block_and_skips_later_rows_without_a_send(app, conn, smtp_server):  # noqa: F811 (fixtures)
    user = seed_user(conn)
    first, queued = instant(conn, user, "email"), instant(conn, user, "email")
    digest = add_digest(conn, user, channel="email")
    smtp_server.reject_recipient(GONE_EMAIL)
    send = app.tasks["alerts.send_delivery"]

    assert send.apply((first,)).get() == "failed"
    assert send.apply((queued,)).get() is None, "already skipped by the block: not due"
    late = instant(conn, user, "email")
    assert send.apply((late,)).get() == "skipped"
    assert app.tasks["alerts.send_digest"].apply((digest,), {"now": iso(WINDOW_END)}).get() is None

    reason = m.destination_disabled("smtp 550 5.1.1 mailbox unavailable")
    rows = {r.id: (r.status, r.last_error) for r in conn.execute(
        sa.select(m.user_alert_deliveries).where(m.user_alert_deliveries.c.delivery_kind == m.INSTANT))}
    assert rows == {first: ("failed", "smtp 550 5.1.1 mailbox unavailable"), queued: ("skipped", reason),
                    late: ("skipped", reason)}
    assert conn.execute(sa.select(m.user_alert_digests.c.status)).scalar_one() == "skipped"
    assert attempts_to(smtp_server, None, "email", GONE_EMAIL) == 1


def test_the_send_task_follows_a_chat_migration(app, conn, provider_api):  # noqa: F811 (fixtures)
    user = seed_user(conn, telegram_chat_id="-4242")
    delivery = instant(conn, user, "telegram")
    provider_api.telegram_error(*UPGRADED, chat_id="-4242", parameters={"migrate_to_chat_id": int(NEW_CHAT)})

    assert app.tasks["alerts.send_delivery"].apply((delivery,)).get() == "sent"

    assert [msg.chat_id for msg in provider_api.telegram_messages] == [NEW_CHAT]
    assert conn.execute(sa.select(m.users.c.telegram_chat_id)).scalar_one() == NEW_CHAT


def test_a_blocked_chat_does_not_wait_for_the_rate_limiter(app, conn, provider_api):  # noqa: F811 (fixtures)
    user = seed_user(conn)
    instant(conn, user, "telegram")
    provider_api.telegram_error(*BLOCKED, chat_id=CHAT)
    (first,) = conn.execute(sa.select(m.user_alert_deliveries.c.id)).scalars()
    assert app.tasks["alerts.send_delivery"].apply((first,)).get() == "failed"
    late = instant(conn, user, "telegram")

    # Within the chat's second after the first send: asking the limiter would have meant a wait.
    assert app.tasks["alerts.send_delivery"].apply((late,)).get() == "skipped"
