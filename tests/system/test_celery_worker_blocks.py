"""Destination health through a real ``celery worker`` (prefork, 2 processes): send tasks
for a hard-bounced mailbox racing each other — the mailbox is tried at most once per
worker process, every row ends failed or skipped with its reason, nothing is lost."""
from __future__ import annotations

from collections import Counter

import sqlalchemy as sa

from alerts.core import tables as m
from tests.support.factories import add_delivery, add_event, add_user
from tests.system.test_celery_worker import (broker_env, broker_url, client, redis_only, wait_until,  # noqa: F401
                                      worker)

GONE_EMAIL = "gone@example.com"
ROWS = 12
POOL_PROCESSES = 2  # the module's worker


@redis_only  # about claims racing, not the broker
def test_send_tasks_racing_on_a_hard_bounced_mailbox_try_it_at_most_once_per_process(  # noqa: F811
        worker, client, conn, smtp_server):
    gone, fine = add_user(conn, email=GONE_EMAIL), add_user(conn, email="fine@example.com")
    rows = [add_delivery(conn, user, add_event(conn, status="fanned_out")) for user in (gone, fine)
            for _ in range(ROWS)]
    smtp_server.reject_recipient(GONE_EMAIL)

    tasks = [client.send_task("alerts.send_delivery", args=[row]) for row in rows]

    wait_until(lambda: all(f"[{task.id}] succeeded" in worker.output() for task in tasks), 60, worker.output)
    outcomes = Counter((r.user_id, r.status, r.last_error) for r in conn.execute(
        sa.select(m.user_alert_deliveries).where(m.user_alert_deliveries.c.id.in_(rows))))
    tried = sum(1 for address, _ in smtp_server.rcpt_log if address == GONE_EMAIL)
    reason = "smtp 550 5.1.1 mailbox unavailable"
    assert 1 <= tried <= POOL_PROCESSES
    assert outcomes == {(gone, "failed", reason): tried,
                        (gone, "skipped", m.destination_disabled(reason)): ROWS - tried,
                        (fine, "sent", None): ROWS}
    assert sorted(mail.rcpt_tos[0] for mail in smtp_server.messages) == ["fine@example.com"] * ROWS
    (block,) = conn.execute(sa.select(m.user_channel_blocks)).all()
    assert (block.user_id, block.channel, block.address, block.reason) == (gone, "email", GONE_EMAIL, reason)
