"""`alerts status`: what is queued, stuck or failing, for an operator at a glance —
including why rows were skipped or failed, counted by reason (a channel not configured,
an unsubscribe, a refusal of our credentials, a bug), so silence never looks like health."""
from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from alerts.sending import blocks
from alerts.core import tables as m
from alerts.phases.intake import CREATED_AT_FROM, CREATED_AT_UNTIL

RECENT_ERRORS = 10
REASONS_SHOWN = 10  # per table and status; the rest are summed as other reasons
OTHER_REASONS = "(other reasons)"


def _tables():
    return [m.alert_events, m.user_alert_deliveries, m.user_alert_digests]


def collect(engine: Engine, now: datetime) -> dict:
    report: dict = {"users": 0, "prefs": 0, "tables": {}, "oldest_pending": {}, "recent_errors": []}
    with engine.connect() as conn:
        report["users"] = conn.execute(sa.select(sa.func.count()).select_from(m.users)).scalar()
        report["prefs"] = conn.execute(sa.select(sa.func.count()).select_from(m.user_alert_prefs)).scalar()
        for table in _tables():
            counts = conn.execute(sa.select(table.c.status, sa.func.count()).group_by(table.c.status)).all()
            report["tables"][table.name] = dict(sorted(counts))
            pending = ("new", "ready") if table is m.alert_events else (m.QUEUED, m.SENDING)
            where = [table.c.status.in_(pending)]
            if table is m.alert_events:  # a producer's infinity (not yet rejected) is no age; the driver cannot read it
                where += [table.c.created_at >= CREATED_AT_FROM, table.c.created_at < CREATED_AT_UNTIL]
            oldest = conn.execute(sa.select(sa.func.min(table.c.created_at)).where(*where)).scalar()
            report["oldest_pending"][table.name] = (
                None if oldest is None else round((now - oldest).total_seconds())
            )
        for table in (m.user_alert_deliveries, m.user_alert_digests):
            rows = conn.execute(
                sa.select(table.c.id, table.c.status, table.c.attempts, table.c.last_error)
                .where(table.c.status.in_((m.FAILED, m.QUEUED)), table.c.last_error.is_not(None))
                .order_by(table.c.id.desc()).limit(RECENT_ERRORS)
            ).mappings()
            report["recent_errors"] += [{"table": table.name, **row} for row in rows]
        rejected = conn.execute(
            sa.select(m.alert_events.c.id, m.alert_events.c.event_key, m.alert_events.c.reject_reason)
            .where(m.alert_events.c.status == "rejected").order_by(m.alert_events.c.id.desc()).limit(RECENT_ERRORS)
        ).mappings()
        report["recently_rejected_events"] = [dict(row) for row in rejected]
        report["blocked_destinations"] = blocks.counts(conn)  # §11.6: in force, by channel and reason
        report["by_reason"] = {table.name: _by_reason(conn, table)
                               for table in (m.user_alert_deliveries, m.user_alert_digests)}
        report["held_by_quiet_hours"] = _held(conn, now)
    return report


def _by_reason(conn, table: sa.Table) -> dict[str, dict[str, int]]:
    """For ``skipped`` and ``failed``: how many rows per reason, most first. Reasons that
    name one event (``superseded by #123``) count as one reason; past the first
    ``REASONS_SHOWN`` of a status the rest are summed as ``(other reasons)``."""
    t = table.c
    superseded = t.last_error.startswith(m.SUPERSEDED_BY, autoescape=True)
    reason = sa.case((superseded, m.SUPERSEDED_BY + "…"), else_=sa.func.coalesce(t.last_error, "(none)"))
    rows = conn.execute(sa.select(t.status, reason.label("reason"), sa.func.count().label("n"))
                        .where(t.status.in_((m.SKIPPED, m.FAILED))).group_by(t.status, reason)).all()
    found: dict[str, dict[str, int]] = {}
    for status in (m.SKIPPED, m.FAILED):
        ranked = sorted(((r.reason, r.n) for r in rows if r.status == status), key=lambda item: (-item[1], item[0]))
        if ranked:
            found[status] = dict(ranked[:REASONS_SHOWN])
            if len(ranked) > REASONS_SHOWN:
                found[status][OTHER_REASONS] = sum(n for _, n in ranked[REASONS_SHOWN:])
    return found


def _held(conn, now: datetime) -> dict:
    """Instant deliveries held by quiet hours (§10.4): queued, never attempted, due later.
    Nothing else makes such a row — a retry has counted an attempt."""
    d = m.user_alert_deliveries
    count, earliest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(d.c.next_retry_at))
        .where(d.c.status == m.QUEUED, d.c.delivery_kind == m.INSTANT, d.c.attempts == 0, d.c.next_retry_at > now)
    ).one()
    return {"count": count, "earliest_release": earliest}


def render(report: dict) -> str:
    lines = [f"users: {report['users']}   prefs: {report['prefs']}"]
    for name, counts in report["tables"].items():
        shown = ", ".join(f"{status} {n}" for status, n in counts.items()) or "empty"
        age = report["oldest_pending"][name]
        lines.append(f"{name}: {shown}" + ("" if age is None else f"   (oldest pending: {_age(age)})"))
    held = report.get("held_by_quiet_hours")
    if held and held["count"]:
        lines.append(f"instant deliveries held by quiet hours: {held['count']}"
                     f" (earliest release {held['earliest_release']:%Y-%m-%d %H:%M:%S} UTC)")
    for name, statuses in report.get("by_reason", {}).items():
        for status, reasons in statuses.items():
            lines.append(f"{name} {status} by reason:")
            lines += [f"  {n:>7}  {printable(reason)}" for reason, n in reasons.items()]
    if report["recent_errors"]:
        lines.append("recent errors:")
        lines += [f"  {e['table']} #{e['id']} {e['status']} after {e['attempts']} attempt(s): "
                  f"{printable(e['last_error'])}" for e in report["recent_errors"]]
    if report["recently_rejected_events"]:
        lines.append("recently rejected events:")
        lines += [f"  #{e['id']} {printable(e['event_key'])}: {printable(e['reject_reason'])}"
                  for e in report["recently_rejected_events"]]
    if report.get("blocked_destinations"):
        lines.append("blocked destinations (alerts destinations):")
        lines += [f"  {channel}: {n} {printable(reason)}" for channel, reasons in report["blocked_destinations"].items()
                  for reason, n in reasons.items()]
    return "\n".join(lines)


def printable(text: str | None) -> str:
    """Producer- and provider-written text, safe for a terminal: control characters (an
    escape sequence in an event_key could rewrite the operator's screen) shown escaped."""
    text = "" if text is None else str(text)
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"
