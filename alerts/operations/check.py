"""``alerts check``: is anything stuck, or silently going wrong? For monitors — an exit
code, one line per kind of problem (docs/operations.md).

Stuck, each one query on a partial or status index:

- ``instant``: queued instant deliveries due (``next_retry_at``, else ``created_at``)
  for longer than ``max_age`` — nothing is sending them (workers or beat down, cron
  stopped). A delivery held by quiet hours is not due before its hold ends, so it is
  not a problem while held;
- ``digests``: queued digests due for longer than ``max_age`` (a digest is due at its
  window's end);
- ``stuck_sends``: rows of either table in ``sending`` past ``ALERTS_SENDING_LEASE_SECONDS``
  — a sender died and nothing has recovered the row.

Silent, among the rows (instant deliveries and digests) created within ``max_age``, each
table read once (one pass, counts per kind and channel):

- ``unconfigured_channels``: ``skipped`` because their channel is not configured (the
  reason alerts/channels/registry.py writes: ``<channel> not configured: …``) — a
  severity-5 alert dropped for want of a setting is not health;
- ``internal_errors``: ``failed`` by our own error (``last_error`` starting
  ``internal error:``, the send path's record of a bug);
- ``credentials_refused``: queued for a retry or failed after their last attempt met a
  refusal of our credentials (``last_error`` starting ``credentials refused:``).
"""
from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from alerts.core import tables as m

DEFAULT_MAX_AGE_SECONDS = 900
MAX_AGE_LIMIT_SECONDS = 10 * 366 * 86400  # ten years: further back than any row, and a valid date
STUCK_KINDS = ("instant", "digests", "stuck_sends")
SILENT_KINDS = ("unconfigured_channels", "internal_errors", "credentials_refused")
KINDS = STUCK_KINDS + SILENT_KINDS
NOT_CONFIGURED = " not configured: "  # "<channel> not configured: <what is missing>"


def find_problems(engine: Engine, now: datetime, max_age_seconds: int, lease_seconds: int) -> list[dict]:
    """One dict per kind of problem found: ``kind``, ``count``, ``oldest_seconds`` (how
    long the oldest such row has been due, sending, or — for the silent kinds — since it
    was created) and, for the silent kinds, ``channels`` (count per channel)."""
    d, g = m.user_alert_deliveries, m.user_alert_digests
    due_before = now - timedelta(seconds=max_age_seconds)
    claimed_before = now - timedelta(seconds=lease_seconds)
    queries = {
        "instant": _overdue(d, due_before, d.c.delivery_kind == m.INSTANT),
        "digests": _overdue(g, due_before),
    }
    with engine.connect() as conn:
        found = {kind: conn.execute(query).one() for kind, query in queries.items()}
        stuck = [conn.execute(_stuck(t, claimed_before)).one() for t in (d, g)]
        silent = [row for t in (d, g) for row in conn.execute(_silent(t, due_before)).mappings()]
    found["stuck_sends"] = (sum(row.count for row in stuck),
                            min((row.oldest for row in stuck if row.oldest is not None), default=None))
    problems = []
    for kind in STUCK_KINDS:
        count, oldest = found[kind]
        if count:
            problems.append({"kind": kind, "count": count, "oldest_seconds": _age(now, oldest)})
    for kind in SILENT_KINDS:
        rows = [row for row in silent if row[f"{kind}_count"]]
        if rows:
            channels: dict[str, int] = {}
            for row in rows:
                channels[row["channel"]] = channels.get(row["channel"], 0) + row[f"{kind}_count"]
            problems.append({"kind": kind, "count": sum(channels.values()),
                             "oldest_seconds": _age(now, min(row[f"{kind}_oldest"] for row in rows)),
                             "channels": dict(sorted(channels.items()))})
    return problems


def _age(now: datetime, then: datetime) -> int:
    return round((now - then).total_seconds())


def _overdue(table: sa.Table, due_before: datetime, *where) -> sa.Select:
    due = sa.func.coalesce(table.c.next_retry_at, table.c.created_at)
    return (sa.select(sa.func.count().label("count"), sa.func.min(due).label("oldest"))
            .where(table.c.status == m.QUEUED, due < due_before, *where))


def _stuck(table: sa.Table, claimed_before: datetime) -> sa.Select:
    claimed = sa.func.coalesce(table.c.claimed_at, table.c.created_at)
    return (sa.select(sa.func.count().label("count"), sa.func.min(claimed).label("oldest"))
            .where(table.c.status == m.SENDING, claimed < claimed_before))


def _silent(table: sa.Table, created_since: datetime) -> sa.Select:
    """Per channel: how many rows created since ``created_since`` are of each silent kind,
    and when the oldest of them was created."""
    t = table.c
    kinds = {
        "unconfigured_channels": sa.and_(t.status == m.SKIPPED,
                                         t.last_error.startswith(t.channel + NOT_CONFIGURED, autoescape=False)),
        "internal_errors": sa.and_(t.status == m.FAILED, t.last_error.startswith(m.INTERNAL_ERROR, autoescape=True)),
        "credentials_refused": sa.and_(t.status.in_((m.QUEUED, m.FAILED)),
                                       t.last_error.startswith(m.CREDENTIALS_REFUSED, autoescape=True)),
    }
    columns = [t.channel]
    for kind, condition in kinds.items():
        columns += [sa.func.count().filter(condition).label(f"{kind}_count"),
                    sa.func.min(t.created_at).filter(condition).label(f"{kind}_oldest")]
    return (sa.select(*columns)
            .where(t.created_at >= created_since, t.status.in_((m.SKIPPED, m.FAILED, m.QUEUED)),
                   t.last_error.is_not(None), sa.or_(*kinds.values()))
            .group_by(t.channel))


def describe(problem: dict, max_age_seconds: int, lease_seconds: int) -> str:
    """The one line a monitor shows for a problem."""
    count, oldest, kind = problem["count"], problem["oldest_seconds"], problem["kind"]
    if kind == "stuck_sends":
        return f"stuck sends: {count} row(s) in sending past the {lease_seconds}s lease (oldest claimed {oldest}s ago)"
    if kind in SILENT_KINDS:
        per_channel = ", ".join(f"{channel} {n}" for channel, n in problem["channels"].items())
        what = {"unconfigured_channels": "skipped because their channel is not configured",
                "internal_errors": "failed by an internal error (a bug: see the log)",
                "credentials_refused": "refused our credentials (a wrong password, token or key?)"}[kind]
        return (f"{kind.replace('_', ' ')}: {count} row(s) created in the last {max_age_seconds}s "
                f"{what} ({per_channel})")
    what = "instant deliveries" if kind == "instant" else "digests"
    return f"{what}: {count} queued and due for more than {max_age_seconds}s (oldest due {oldest}s ago)"
