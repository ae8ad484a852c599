"""Phase C — send due instant deliveries, then due digests (SPEC §4 C).

Every send follows the same three steps, each of which the caller can rely on:
1. claim: a committed UPDATE to ``sending`` (FOR UPDATE SKIP LOCKED on PostgreSQL) that
   only one process can win, counting the attempt and stamping ``claimed_at``;
2. send, outside any transaction;
3. record the outcome, fenced on (status='sending', attempts) so a process whose lease
   expired and whose row was re-claimed by someone else cannot overwrite the newer claim.
Rows left in ``sending`` past the lease are put back by ``recover_stale``.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts import models as m
from alerts import retry
from alerts.channels import DeliveryError
from alerts.channels.registry import ChannelSet, recipient_column
from alerts.config import Settings
from alerts.db import Database, is_postgres
from alerts.messages import Message, render_digest, render_instant

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One claimed row, ready to send (or already known to be skipped)."""

    id: int
    attempts: int
    channel: str
    recipient: str | None = None
    message: Message | None = None
    skip_reason: str | None = None


@dataclass
class SendCounts:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, outcome: retry.Outcome) -> None:
        key = "retried" if outcome.status == "queued" else outcome.status
        setattr(self, key, getattr(self, key) + 1)

    def as_dict(self) -> dict:
        return {"sent": self.sent, "retried": self.retried, "failed": self.failed, "skipped": self.skipped}


@dataclass(frozen=True)
class Kind:
    """What differs between sending instant deliveries and sending digests."""

    label: str
    table: Callable[[], sa.Table]
    due: Callable[[sa.Table, datetime], list]
    load: Callable[[Connection, list[tuple[int, int]], Settings, ChannelSet], list[Job]]


# --- the phase ---------------------------------------------------------------------------

def run_phase_c(db: Database, now: datetime, settings: Settings, channels: ChannelSet,
                rng: random.Random | None = None) -> dict:
    recover_stale(db, now, settings)
    return {
        "instant": send_due(db, INSTANT, now, settings, channels, rng).as_dict(),
        "digests": send_due(db, DIGEST, now, settings, channels, rng).as_dict(),
    }


def send_due(db: Database, kind: Kind, now: datetime, settings: Settings, channels: ChannelSet,
             rng: random.Random | None = None) -> SendCounts:
    """Claim due rows a batch at a time and send them until none are due."""
    counts = SendCounts()
    while True:
        with db.transaction() as conn:
            claimed = claim_due(conn, kind.table(), kind.due(kind.table(), now), now, settings.send_batch_size)
            if not claimed:
                return counts
            jobs = kind.load(conn, claimed, settings, channels)
        for job in jobs:
            counts.add(_send_and_record(db, kind, job, now, settings, channels, rng))


def send_one(db: Database, kind: Kind, row_id: int, now: datetime, settings: Settings,
             channels: ChannelSet, rng: random.Random | None = None) -> str | None:
    """Claim and send one row (the Celery send tasks). Returns the outcome status, or
    None when the row was not due or another process had already claimed it."""
    with db.transaction() as conn:
        table = kind.table()
        claimed = claim_due(conn, table, [table.c.id == row_id, *kind.due(table, now)], now, 1)
        if not claimed:
            return None
        (job,) = kind.load(conn, claimed, settings, channels)
    return _send_and_record(db, kind, job, now, settings, channels, rng).status


def _send_and_record(db, kind, job: Job, now, settings, channels, rng) -> retry.Outcome:
    outcome = _attempt(job, now, settings, channels, rng)
    with db.transaction() as conn:
        if not record(conn, kind.table(), job, outcome):
            log.warning("%s %s: claim lost before the outcome (%s) was recorded", kind.label, job.id, outcome.status)
    return outcome


def _attempt(job: Job, now, settings, channels: ChannelSet, rng) -> retry.Outcome:
    if job.skip_reason:
        return retry.skipped(job.skip_reason)
    channel = channels.get(job.channel)
    if channel is None:
        return retry.skipped(channels.unconfigured_reason(job.channel) or f"{job.channel} not configured")
    try:
        channel.send(job.recipient, job.message)
    except DeliveryError as exc:
        outcome = retry.after_failure(exc, job.attempts, now, settings, rng)
        log.info("%s send %s failed (%s): %s", job.channel, job.id, outcome.status, exc.reason)
        return outcome
    return retry.sent(now)


# --- claims and outcomes -----------------------------------------------------------------

def claim_due(conn: Connection, table: sa.Table, where: Iterable, now: datetime, limit: int) -> list[tuple[int, int]]:
    """Move up to ``limit`` matching queued rows to ``sending``; return (id, attempts)."""
    pick = sa.select(table.c.id).where(table.c.status == "queued", *where).order_by(table.c.id).limit(limit)
    if is_postgres(conn):
        pick = pick.with_for_update(skip_locked=True)
    stmt = (
        sa.update(table)
        .where(table.c.id.in_(pick.scalar_subquery()))
        .values(status="sending", attempts=table.c.attempts + 1, claimed_at=now)
        .returning(table.c.id, table.c.attempts)
    )
    return sorted((row.id, row.attempts) for row in conn.execute(stmt))


def record(conn: Connection, table: sa.Table, job: Job, outcome: retry.Outcome) -> bool:
    """Write the outcome if our claim still stands. A skip gives the attempt back: no
    send was tried."""
    attempts = job.attempts - 1 if outcome.status == "skipped" else job.attempts
    result = conn.execute(
        sa.update(table)
        .where(table.c.id == job.id, table.c.status == "sending", table.c.attempts == job.attempts)
        .values(status=outcome.status, last_error=outcome.last_error, next_retry_at=outcome.next_retry_at,
                sent_at=outcome.sent_at, claimed_at=None, attempts=attempts)
    )
    return result.rowcount == 1


def recover_stale(db: Database, now: datetime, settings: Settings) -> dict:
    """Put rows abandoned in ``sending`` (a crashed or killed sender) back in the queue,
    or fail them when their attempts are used up. Returns counts per table."""
    cutoff = now - timedelta(seconds=settings.sending_lease_seconds)
    reason = f"send interrupted: no outcome within the {settings.sending_lease_seconds}s lease"
    counts = {}
    with db.transaction() as conn:
        for kind in (INSTANT, DIGEST):
            table = kind.table()
            used_up = table.c.attempts >= settings.max_attempts
            result = conn.execute(
                sa.update(table)
                .where(table.c.status == "sending", table.c.claimed_at < cutoff)
                .values(
                    status=sa.case((used_up, "failed"), else_="queued"),
                    last_error=sa.case((used_up, reason + " (attempts used up)"), else_=reason),
                    next_retry_at=sa.case((used_up, sa.null()), else_=sa.literal(now, m.UTCDateTime())),
                    claimed_at=None,
                )
            )
            counts[kind.label] = result.rowcount
    if any(counts.values()):
        log.warning("recovered abandoned sends: %s", counts)
    return counts


# --- instant deliveries -------------------------------------------------------------------

def _due_instant(table: sa.Table, now: datetime) -> list:
    return [
        table.c.delivery_kind == "instant",
        sa.or_(table.c.next_retry_at.is_(None), table.c.next_retry_at <= now),
    ]


def _load_instant(conn: Connection, claimed: list[tuple[int, int]], settings: Settings,
                  channels: ChannelSet) -> list[Job]:
    d, u, e = m.user_alert_deliveries, m.users, m.alert_events
    attempts = dict(claimed)
    rows = conn.execute(
        sa.select(d.c.id.label("delivery_id"), d.c.channel, u.c.is_active,
                  u.c.email, u.c.telegram_chat_id, u.c.phone,
                  e.c.id, e.c.event_key, e.c.alert_type, e.c.region, e.c.severity, e.c.title,
                  e.c.summary, e.c.url, e.c.created_at)
        .select_from(d.join(u, u.c.id == d.c.user_id).join(e, e.c.id == d.c.alert_event_id))
        .where(d.c.id.in_(list(attempts)))
        .order_by(d.c.id)
    ).mappings()
    jobs = []
    for row in rows:
        job = Job(row["delivery_id"], attempts[row["delivery_id"]], row["channel"])
        _address(job, row, channels)
        if job.skip_reason is None and channels.get(job.channel) is not None:
            job.message = render_instant(job.channel, row, delivery_id=job.id, settings=settings)
        jobs.append(job)
    return jobs


def _address(job: Job, user_row, channels: ChannelSet) -> None:
    """Fill in the recipient, or the reason the job is skipped without a send."""
    if not user_row["is_active"]:
        job.skip_reason = "user is inactive"
        return
    address = (user_row[recipient_column(job.channel)] or "").strip()
    if not address:
        job.skip_reason = f"recipient has no {recipient_column(job.channel)}"
    job.recipient = address or None


INSTANT = Kind("instant", lambda: m.user_alert_deliveries, _due_instant, _load_instant)


# --- digests ------------------------------------------------------------------------------

def _due_digest(table: sa.Table, now: datetime) -> list:
    return [table.c.next_retry_at <= now]


def _load_digests(conn: Connection, claimed: list[tuple[int, int]], settings: Settings,
                  channels: ChannelSet) -> list[Job]:
    g, i, d, u, e = (m.user_alert_digests, m.user_alert_digest_items, m.user_alert_deliveries,
                     m.users, m.alert_events)
    attempts = dict(claimed)
    digests = conn.execute(
        sa.select(g.c.id, g.c.digest_key, g.c.user_id, g.c.channel, g.c.period, g.c.window_start,
                  g.c.window_end, u.c.is_active, u.c.email, u.c.telegram_chat_id, u.c.phone,
                  sa.func.coalesce(u.c.timezone, settings.timezone).label("timezone"))
        .select_from(g.join(u, u.c.id == g.c.user_id))
        .where(g.c.id.in_(list(attempts)))
        .order_by(g.c.id)
    ).mappings().all()
    items: dict[int, list] = {digest["id"]: [] for digest in digests}
    for row in conn.execute(
        sa.select(i.c.digest_id, e.c.id, e.c.event_key, e.c.alert_type, e.c.region, e.c.severity,
                  e.c.title, e.c.summary, e.c.url, e.c.created_at)
        .select_from(i.join(d, d.c.id == i.c.delivery_id).join(e, e.c.id == d.c.alert_event_id))
        .where(i.c.digest_id.in_(list(attempts)))
    ).mappings():
        items[row["digest_id"]].append(row)
    jobs = []
    for digest in digests:
        job = Job(digest["id"], attempts[digest["id"]], digest["channel"])
        _address(job, digest, channels)
        if not items[job.id]:
            job.skip_reason = "digest has no items"
        if job.skip_reason is None and channels.get(job.channel) is not None:
            job.message = render_digest(job.channel, digest, items[job.id], settings=settings)
        jobs.append(job)
    return jobs


DIGEST = Kind("digests", lambda: m.user_alert_digests, _due_digest, _load_digests)
