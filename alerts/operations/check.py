"""``alerts check``: is anything stuck? For monitors — an exit code, one line per kind of
problem (SPEC §12.4).

Three kinds, each one query on a partial or status index:

- ``instant``: queued instant deliveries due (``next_retry_at``, else ``created_at``)
  for longer than ``max_age`` — nothing is sending them (workers or beat down, cron
  stopped). A delivery held by quiet hours is not due before its hold ends, so it is
  not a problem while held;
- ``digests``: queued digests due for longer than ``max_age`` (a digest is due at its
  window's end);
- ``stuck_sends``: rows of either table in ``sending`` past ``ALERTS_SENDING_LEASE_SECONDS``
  — a sender died and nothing has recovered the row.
"""
from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from alerts.core import tables as m

DEFAULT_MAX_AGE_SECONDS = 900
MAX_AGE_LIMIT_SECONDS = 10 * 366 * 86400  # ten years: further back than any row, and a valid date
KINDS = ("instant", "digests", "stuck_sends")


def find_problems(engine: Engine, now: datetime, max_age_seconds: int, lease_seconds: int) -> list[dict]:
    """One dict per kind of problem found: ``kind``, ``count``, ``oldest_seconds``
    (how long the oldest such row has been due, or sending)."""
    d, g = m.user_alert_deliveries, m.user_alert_digests
    due_before = now - timedelta(seconds=max_age_seconds)
    claimed_before = now - timedelta(seconds=lease_seconds)
    queries = {
        "instant": _overdue(d, due_before, d.c.delivery_kind == m.INSTANT),
        "digests": _overdue(g, due_before),
    }
    problems = []
    with engine.connect() as conn:
        found = {kind: conn.execute(query).one() for kind, query in queries.items()}
        stuck = [conn.execute(_stuck(t, claimed_before)).one() for t in (d, g)]
    found["stuck_sends"] = (sum(row.count for row in stuck),
                            min((row.oldest for row in stuck if row.oldest is not None), default=None))
    for kind in KINDS:
        count, oldest = found[kind]
        if count:
            problems.append({"kind": kind, "count": count, "oldest_seconds": round((now - oldest).total_seconds())})
    return problems


def _overdue(table: sa.Table, due_before: datetime, *where) -> sa.Select:
    due = sa.func.coalesce(table.c.next_retry_at, table.c.created_at)
    return (sa.select(sa.func.count().label("count"), sa.func.min(due).label("oldest"))
            .where(table.c.status == m.QUEUED, due < due_before, *where))


def _stuck(table: sa.Table, claimed_before: datetime) -> sa.Select:
    claimed = sa.func.coalesce(table.c.claimed_at, table.c.created_at)
    return (sa.select(sa.func.count().label("count"), sa.func.min(claimed).label("oldest"))
            .where(table.c.status == m.SENDING, claimed < claimed_before))


def describe(problem: dict, max_age_seconds: int, lease_seconds: int) -> str:
    """The one line a monitor shows for a problem."""
    count, oldest = problem["count"], problem["oldest_seconds"]
    if problem["kind"] == "stuck_sends":
        return f"stuck sends: {count} row(s) in sending past the {lease_seconds}s lease (oldest claimed {oldest}s ago)"
    what = "instant deliveries" if problem["kind"] == "instant" else "digests"
    return f"{what}: {count} queued and due for more than {max_age_seconds}s (oldest due {oldest}s ago)"
