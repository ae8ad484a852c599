"""The two sendable tables — instant deliveries and digests — and every operation a
sender performs on them (docs/architecture.md). Phase C, the Celery dispatch and the send tasks
touch a row's send state through these and nothing else:

    due(now)                    the WHERE clause of the queued rows that may go out at ``now``
    claim(conn, now, limit)     queued → sending, counting the attempt, stamped claimed_at;
                                FOR UPDATE SKIP LOCKED, so only one process wins a row
    load(conn, claimed, …)      what the sends need: the recipient and the rendered message,
                                or the reason the row is skipped without a send (among them
                                a block on the destination, joined in: alerts/sending/blocks.py)
    record(conn, job, outcome)  the outcome, fenced on the claim (status 'sending' and the
                                attempt it counted): a sender whose lease ran out cannot
                                overwrite the claim of the sender that took over
    recheck(conn, job)          the reason a loaded job must no longer go out (an unsubscribe
                                or a block committed since it was loaded), or None
    release(conn, claimed, …)   claims given back unsent: queued again, attempt uncounted —
                                optionally held until a time (a rate-limit wait)
    recover(conn, now, …)       rows abandoned in sending past the lease: queued again, or
                                failed once their attempts are used up

``INSTANT`` and ``DIGESTS`` differ only in which rows are due and what a send loads.

Each statement is built once, with bind parameters, and reused (its measured gain:
docs/decisions.md). A message that cannot be rendered (a bug, a template) does not stop
the batch: its job carries the error and is recorded failed (``internal error: …``).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts.sending import blocks
from alerts.core import tables as m
from alerts.sending import retry
from alerts.channels.registry import ChannelSet
from alerts.core.settings import Settings
from alerts.core.db import is_postgres
from alerts.messages import Message, render_digest, render_instant

log = logging.getLogger(__name__)

Claim = tuple[int, int]  # (row id, attempts counted by the claim)


@dataclass
class Job:
    """One claimed row, ready to send (or known to be skipped without a send)."""

    id: int
    attempts: int
    channel: str
    user_id: int
    recipient: str | None = None
    message: Message | None = None
    skip_reason: str | None = None
    error: str | None = None  # the message could not be built: ``internal error: <type>``

    @property
    def claim(self) -> Claim:
        return self.id, self.attempts


def _param(name: str, type_=None) -> sa.BindParameter:
    return sa.bindparam(name, type_=type_)


NOW = _param("now", m.UTCDateTime())


class Outbox:
    """One sendable table. ``name`` is its key in Phase C's counts."""

    name: str
    table: sa.Table

    def due(self, now: datetime | sa.BindParameter) -> list[sa.ColumnElement]:
        raise NotImplementedError

    def claim(self, conn: Connection, now: datetime, limit: int, *, row_id: int | None = None) -> list[Claim]:
        """Move up to ``limit`` due rows (or just ``row_id``, if it is due) to ``sending``."""
        params = {"now": now, "limit": limit, "row_id": row_id}
        rows = conn.execute(self._claim(is_postgres(conn), row_id is not None), params)
        return sorted((row.id, row.attempts) for row in rows)

    @functools.cache
    def _claim(self, postgres: bool, one_row: bool) -> sa.Update:
        t = self.table
        pick = sa.select(t.c.id).where(t.c.status == m.QUEUED, *self.due(NOW))
        if one_row:
            pick = pick.where(t.c.id == _param("row_id"))
        pick = pick.order_by(t.c.id).limit(_param("limit", sa.Integer))
        if postgres:
            pick = pick.with_for_update(skip_locked=True)
        return (sa.update(t).where(t.c.id.in_(pick.scalar_subquery()))
                .values(status=m.SENDING, attempts=t.c.attempts + 1, claimed_at=NOW)
                .returning(t.c.id, t.c.attempts))

    def load(self, conn: Connection, claimed: Sequence[Claim], settings: Settings,
             channels: ChannelSet) -> list[Job]:
        """Jobs for claimed rows, in id order. Run it after the claim, never before: only
        the claim shuts Phase D out of a digest, so only a read after it sees every item."""
        raise NotImplementedError

    def record(self, conn: Connection, job: Job, outcome: retry.Outcome) -> bool:
        """Write the outcome if our claim still stands; False if someone else's claim has
        replaced it. A skip gives the attempt back: no send was tried."""
        attempts = job.attempts - 1 if outcome.status == m.SKIPPED else job.attempts
        result = conn.execute(self._record(), {
            "r_id": job.id, "r_claimed": job.attempts, "r_status": outcome.status, "r_last_error": outcome.last_error,
            "r_next_retry_at": outcome.next_retry_at, "r_sent_at": outcome.sent_at, "r_attempts": attempts})
        if result.rowcount != 1:
            log.warning("%s %s: claim lost before the outcome (%s) was recorded", self.name, job.id, outcome.status)
        return result.rowcount == 1

    @functools.cache
    def _record(self) -> sa.Update:
        t = self.table
        return (sa.update(t).where(*self._fence())
                .values(status=_param("r_status"), last_error=_param("r_last_error"), claimed_at=None,
                        next_retry_at=_param("r_next_retry_at", m.UTCDateTime()),
                        sent_at=_param("r_sent_at", m.UTCDateTime()), attempts=_param("r_attempts")))

    def release(self, conn: Connection, claimed: Sequence[Claim], *, hold_until: datetime | None = None,
                due_at: datetime | None = None) -> None:
        """Give back claims that were never sent: queued again, the attempt not counted.
        Fenced like ``record``: a claim someone else has taken over since is left alone.
        ``hold_until``: the row's Celery task re-schedules itself for then — its enqueue
        mark moves there, so no second task is published meanwhile (alerts/sending/dispatch.py);
        ``due_at``: the row is not due again before then (a runner's rate-limit wait)."""
        params = [{"r_id": row_id, "r_claimed": attempts} for row_id, attempts in claimed]
        if hold_until is not None or due_at is not None:
            t = self.table
            stmt = self._release().values(enqueued_at=hold_until if hold_until is not None else t.c.enqueued_at,
                                          next_retry_at=due_at if due_at is not None else t.c.next_retry_at)
            conn.execute(stmt, params)
            return
        conn.execute(self._release(), params)

    @functools.cache
    def _release(self) -> sa.Update:
        t = self.table
        return sa.update(t).where(*self._fence()).values(status=m.QUEUED, attempts=t.c.attempts - 1, claimed_at=None)

    def waiting(self, conn: Connection, row_id: int, now: datetime) -> bool:
        """The row is queued and due, yet a claim did not get it: another transaction holds
        its lock (a Phase D, an unsubscribe). A plain read: it never waits for that lock."""
        return conn.execute(self._waiting(), {"row_id": row_id, "now": now}).first() is not None

    @functools.cache
    def _waiting(self) -> sa.Select:
        t = self.table
        return sa.select(t.c.id).where(t.c.id == _param("row_id"), t.c.status == m.QUEUED, *self.due(NOW))

    def recheck(self, conn: Connection, job: Job) -> str | None:
        """Why ``job``, loaded earlier in this batch, must not go out now — its user
        unsubscribed, became inactive, or its destination was blocked since — or None."""
        row = conn.execute(self._recheck(), {"row_id": job.id}).mappings().first()
        if row is None:
            return None
        return _addressed(Job(job.id, job.attempts, job.channel, job.user_id), row).skip_reason

    @functools.cache
    def _recheck(self) -> sa.Select:
        t, u = self.table, m.users
        return (sa.select(*_user_columns(), BLOCK_REASON, _unsubscribed(t))
                .select_from(t.join(u, u.c.id == t.c.user_id).outerjoin(m.user_channel_blocks, blocks.in_force(t)))
                .where(t.c.id == _param("row_id")))

    def _fence(self) -> list[sa.ColumnElement]:
        """Our claim still stands: the row is ``sending`` with the attempt we counted."""
        t = self.table
        return [t.c.id == _param("r_id"), t.c.status == m.SENDING, t.c.attempts == _param("r_claimed")]


class InstantOutbox(Outbox):
    name, table = "instant", m.user_alert_deliveries

    def due(self, now):
        t = self.table
        return [t.c.delivery_kind == m.INSTANT, sa.or_(t.c.next_retry_at.is_(None), t.c.next_retry_at <= now)]

    def load(self, conn, claimed, settings, channels):
        attempts = dict(claimed)
        rows = conn.execute(self._load(), {"ids": list(attempts)}).mappings()
        jobs = []
        for row in rows:
            job = _addressed(Job(row["delivery_id"], attempts[row["delivery_id"]], row["channel"], row["user_id"]), row)
            if job.skip_reason is None and channels.get(job.channel) is not None:
                _render(job, render_instant, job.channel, row, delivery_id=job.id, settings=settings,
                        installation_id=row["installation_id"])
            jobs.append(job)
        return jobs

    @functools.cache
    def _load(self) -> sa.Select:
        d, u, e = self.table, m.users, m.alert_events
        return (sa.select(d.c.id.label("delivery_id"), d.c.user_id, d.c.channel, *_user_columns(), BLOCK_REASON,
                          _unsubscribed(d), INSTALLATION_ID,
                          *(e.c[key] for key in EVENT_KEYS))
                .select_from(d.join(u, u.c.id == d.c.user_id).outerjoin(m.user_channel_blocks, blocks.in_force(d))
                             .join(e, e.c.id == d.c.alert_event_id))
                .where(d.c.id.in_(sa.bindparam("ids", expanding=True))).order_by(d.c.id))


class DigestOutbox(Outbox):
    name, table = "digests", m.user_alert_digests

    def due(self, now):
        return [self.table.c.next_retry_at <= now]

    def load(self, conn, claimed, settings, channels):
        attempts = dict(claimed)
        rows = conn.execute(self._load(), {"ids": list(attempts), "timezone": settings.timezone}).mappings()
        digests: dict[int, tuple[Mapping, list[dict]]] = {}
        for row in rows:
            _, items = digests.setdefault(row["digest_id"], (row, []))
            if row["id"] is not None:
                items.append({key: row[key] for key in EVENT_KEYS})
        jobs = []
        for digest_id, (digest, items) in digests.items():
            job = _addressed(Job(digest_id, attempts[digest_id], digest["channel"], digest["user_id"]), digest)
            if job.skip_reason is None and not items:
                job.skip_reason = m.DIGEST_WITHOUT_ITEMS
            if job.skip_reason is None and channels.get(job.channel) is not None:
                _render(job, render_digest, job.channel, digest, items, settings=settings,
                        installation_id=digest["installation_id"])
            jobs.append(job)
        return jobs

    @functools.cache
    def _load(self) -> sa.Select:
        """One row per item; a digest without items is one row with its event columns null."""
        g, i, d, u, e = (self.table, m.user_alert_digest_items, m.user_alert_deliveries, m.users, m.alert_events)
        return (sa.select(g.c.id.label("digest_id"), g.c.user_id, g.c.digest_key, g.c.channel, g.c.period,
                          g.c.window_start, g.c.window_end, *_user_columns(), BLOCK_REASON, _unsubscribed(g),
                          sa.func.coalesce(u.c.timezone, _param("timezone", sa.Text)).label("timezone"), INSTALLATION_ID,
                          *(e.c[key] for key in EVENT_KEYS))
                .select_from(g.join(u, u.c.id == g.c.user_id).outerjoin(m.user_channel_blocks, blocks.in_force(g))
                             .outerjoin(i, i.c.digest_id == g.c.id)
                             .outerjoin(d, d.c.id == i.c.delivery_id).outerjoin(e, e.c.id == d.c.alert_event_id))
                .where(g.c.id.in_(sa.bindparam("ids", expanding=True))).order_by(g.c.id))


INSTANT, DIGESTS = InstantOutbox(), DigestOutbox()
OUTBOXES = (INSTANT, DIGESTS)  # Phase C sends instant deliveries first
EVENT_KEYS = ("id", "event_key", "alert_type", "region", "severity", "title", "summary", "url", "created_at",
              "collapse_key")


def recover(conn: Connection, now: datetime, settings: Settings) -> dict[str, int]:
    """Put rows abandoned in ``sending`` (a crashed or killed sender) back in the queue,
    due at once, or fail them when their attempts are used up. Counts per table."""
    cutoff = now - timedelta(seconds=settings.sending_lease_seconds)
    counts = {}
    for outbox in OUTBOXES:
        t = outbox.table
        used_up = t.c.attempts >= settings.max_attempts
        counts[outbox.name] = conn.execute(
            sa.update(t).where(t.c.status == m.SENDING, t.c.claimed_at < cutoff)
            .values(status=sa.case((used_up, m.FAILED), else_=m.QUEUED),
                    last_error=sa.case((used_up, m.send_interrupted(settings.sending_lease_seconds, True)),
                                       else_=m.send_interrupted(settings.sending_lease_seconds, False)),
                    next_retry_at=sa.case((used_up, sa.null()), else_=sa.literal(now, m.UTCDateTime())),
                    claimed_at=None)).rowcount
    if any(counts.values()):
        log.warning("recovered abandoned sends: %s", counts)
    return counts


def skip_queued(conn: Connection, user_id: int, channel: str, reason: str, *where: sa.ColumnElement,
                digest_deliveries: bool = True) -> dict[str, int]:
    """Make the user's ``queued`` rows on ``channel`` ``skipped`` with ``reason`` — digests,
    then instant deliveries (and, with ``digest_deliveries``, digest deliveries not yet in
    a digest); rows already ``sending`` are never touched. Counts per table.

    Digests before deliveries, the order Phase D locks them in: the other order would let
    an unsubscribe and a Phase D each wait for the other (a deadlock). Meeting a Phase D
    on its digest, this waits for its commit; the deliveries it batched are then no
    longer queued, the rest are skipped here, and a digest it created meanwhile is
    skipped by the sender's own check (``_unsubscribed``, read after its claim)."""
    counts = {}
    for table in (m.user_alert_digests, m.user_alert_deliveries):
        conditions = [table.c.user_id == user_id, table.c.channel == channel, table.c.status == m.QUEUED, *where]
        if table is m.user_alert_deliveries and not digest_deliveries:
            conditions.append(table.c.delivery_kind == m.INSTANT)
        counts[table.name] = conn.execute(sa.update(table).where(*conditions).values(
            status=m.SKIPPED, last_error=reason, next_retry_at=None, claimed_at=None)).rowcount
    return counts


BLOCK_REASON = m.user_channel_blocks.c.reason.label("block_reason")  # null unless a block is in force
# The installation's identifier, for the Message-ID: one more column of the load (a scalar
# subquery on a one-row table), so rendering never queries and a send costs no round trip.
INSTALLATION_ID = (sa.select(m.installation.c.installation_id).where(m.installation.c.id == 1)
                   .scalar_subquery().label("installation_id"))


def _user_columns() -> list[sa.Column]:
    u = m.users
    return [u.c.is_active, u.c.email, u.c.telegram_chat_id, u.c.phone]


def _unsubscribed(t: sa.Table) -> sa.ColumnElement:
    """The row's user has preferences on its channel and none enabled: unsubscribed
    (docs/web-and-security.md). Read after the claim, so a row claimed after an unsubscribe committed
    is skipped, even one a concurrent fan-out made from preferences read just before.

    One scalar subquery, an index probe per row: an EXISTS / NOT EXISTS pair, which
    PostgreSQL turns into joins over the whole table, cost more than twice as much
    (bench/bench_unsubscribe.py; docs/decisions.md)."""
    p = m.user_alert_prefs
    on_channel = [p.c.user_id == t.c.user_id, p.c.channel == t.c.channel]
    any_enabled = sa.select(sa.func.max(sa.case((p.c.enabled, 1), else_=0))).where(*on_channel).scalar_subquery()
    return (any_enabled == 0).label("unsubscribed")  # NULL (not unsubscribed) without preferences


def _render(job: Job, render, *args, **kwargs) -> None:
    """The job's message, or its error: one row's bug must not stop the batch."""
    try:
        job.message = render(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 — any failure to build is this row's alone
        job.error = internal_error(exc)
        log.exception("%s %s: the message could not be built", job.channel, job.id)


def internal_error(exc: BaseException) -> str:
    """``last_error`` of a row failed by our own bug, not by a provider's answer."""
    return f"{m.INTERNAL_ERROR} {type(exc).__name__}"


def _addressed(job: Job, user_row: Mapping) -> Job:
    """The job with its recipient, or the reason it is skipped without a send."""
    if not user_row["is_active"]:
        job.skip_reason = m.USER_INACTIVE
        return job
    if user_row["unsubscribed"]:
        job.skip_reason = m.UNSUBSCRIBED
        return job
    address = (user_row[m.RECIPIENT_COLUMNS[job.channel]] or "").strip()
    job.recipient = address or None
    if not address:
        job.skip_reason = m.no_address(job.channel)
    elif user_row["block_reason"] is not None:
        job.skip_reason = m.destination_disabled(user_row["block_reason"])
    return job
