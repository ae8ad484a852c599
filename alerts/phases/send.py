"""Phase C — send due instant deliveries, then due digests (SPEC §4 C).

Every send follows the same three steps, each of which the caller can rely on:
1. claim: a committed UPDATE to ``sending`` (FOR UPDATE SKIP LOCKED on PostgreSQL) that
   only one process can win, counting the attempt and stamping ``claimed_at``;
2. send, outside any transaction;
3. record the outcome, fenced on (status='sending', attempts) so a process whose lease
   expired and whose row was re-claimed by someone else cannot overwrite the newer claim.
Rows left in ``sending`` past the lease are put back by ``recover_stale``.

On PostgreSQL (outside a dry run) claims, loads and outcomes are single statements on
one connection in autocommit mode: the server commits each one as it runs, as durably
as a transaction would, in one round trip instead of four (pool ping, BEGIN, statement,
COMMIT). That keeps the per-message cost of recording each outcome right after its send
small without batching outcomes, which would widen the duplicate window after a crash.
A one-row send (the Celery tasks) sends its claim and load as one prepared script
(``_claim_and_load_script``), and every outcome is a prepared UPDATE committed in the
connection's helper thread while the next send gets going (``Autocommit.later``).
"""
from __future__ import annotations

import functools
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts import models as m
from alerts import retry
from alerts.channels import DeliveryError
from alerts.channels.registry import ChannelSet, recipient_column
from alerts.config import Settings
from alerts.db import Database, Script, is_postgres
from alerts.messages import Message, render_digest, render_instant

log = logging.getLogger(__name__)

# How long a statement waits for the database to come back (7.6 s in all, far below any
# sensible lease): an outcome that cannot be written leaves its row in `sending`, and the
# row would be sent a second time after the lease although this process knows it was sent.
RECONNECT_PAUSES_SECONDS = (0.1, 0.5, 1.0, 2.0, 4.0)

T = TypeVar("T")
Write = Callable[[Callable[[Connection], T]], T]


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
    # The data a send needs: a query without its row filter (parameter ``timezone``,
    # the app's), ordered by row id, then the jobs made from its rows.
    select: Callable[[], sa.Select]
    jobs: Callable[[Sequence[Mapping], dict[int, int], Settings, ChannelSet], list[Job]]

    def query(self) -> sa.Select:
        """``select`` for the rows whose ids are given as ``ids``."""
        return _query_for_ids(self)

    def load(self, conn: Connection, claimed: list[tuple[int, int]], settings: Settings,
             channels: ChannelSet) -> list[Job]:
        """Jobs (rendered messages, or skip reasons) for claimed (id, attempts) pairs."""
        ids = [row_id for row_id, _ in claimed]
        rows = conn.execute(self.query(), {"ids": ids, "timezone": settings.timezone}).mappings().all()
        return self.jobs(rows, dict(claimed), settings, channels)


@functools.cache
def _query_for_ids(kind: Kind) -> sa.Select:
    return kind.select().where(kind.table().c.id.in_(sa.bindparam("ids", expanding=True)))


# --- the phase ---------------------------------------------------------------------------

def run_phase_c(db: Database, now: datetime, settings: Settings, channels: ChannelSet,
                rng: random.Random | None = None) -> dict:
    """Time runs on through the phase, as through a run (``pipeline.run_phases``): the
    digest pass starts at ``now`` plus however long the instant pass took, so claims it
    makes after a long instant pass are not dated back — workers' lease recovery would
    take them for abandoned and send them again (found by the soak)."""
    started = time.monotonic()

    def clock() -> datetime:
        return now + timedelta(seconds=int(time.monotonic() - started))

    recover_stale(db, now, settings)
    return {
        "instant": send_due(db, INSTANT, clock(), settings, channels, rng).as_dict(),
        "digests": send_due(db, DIGEST, clock(), settings, channels, rng).as_dict(),
    }


def send_due(db: Database, kind: Kind, now: datetime, settings: Settings, channels: ChannelSet,
             rng: random.Random | None = None) -> SendCounts:
    """Claim due rows a batch at a time and send them until none are due.

    Time runs on from ``now`` while the run lasts (in whole seconds): each claim is
    stamped with the time it is taken, so another process's lease recovery never sees a fresh claim as old. A
    batch whose sends outlast half the lease (a slow provider) gives its unsent rows back
    and claims afresh, so no claim of ours is ever recovered — and sent again — by
    someone else while we still hold it.
    """
    counts = SendCounts()
    table = kind.table()
    due = kind.due(table, now)
    started = time.monotonic()
    budget = settings.sending_lease_seconds / 2
    with statements(db) as write:
        while True:
            claimed_at = now + timedelta(seconds=int(time.monotonic() - started))
            jobs = claim(write, kind,
                         lambda conn: claim_due(conn, table, due, claimed_at, settings.send_batch_size),
                         settings, channels)
            if not jobs:
                return counts
            give_back_at = time.monotonic() + budget
            for n, job in enumerate(jobs):
                if time.monotonic() > give_back_at:
                    write(lambda conn: _release(conn, table, [(j.id, j.attempts) for j in jobs[n:]]))
                    break
                outcome = _attempt(job, now, settings, channels, rng)
                counts.add(outcome)
                _record_outcome(write, kind, job, outcome)


def send_one(db: Database, kind: Kind, row_id: int, now: datetime, settings: Settings,
             channels: ChannelSet, rng: random.Random | None = None, *,
             autocommit: Autocommit | None = None) -> str | None:
    """Claim and send one row (the Celery send tasks). Returns the outcome status, or
    None when the row was not due or another process had already claimed it.
    ``autocommit``: see ``statements``; the outcome's commit may still be in flight on
    it when this returns (``autocommit.wait()`` waits; its next statement does anyway).
    """
    with statements(db, autocommit) as write:
        if isinstance(write, Autocommit):
            jobs = _claim_and_load_one(write, kind, row_id, now, settings, channels)
        else:
            jobs = claim(write, kind, lambda conn: _claim_one(conn, kind, row_id, now), settings, channels)
        if not jobs:
            return None
        outcome = _attempt(jobs[0], now, settings, channels, rng)
        _record_outcome(write, kind, jobs[0], outcome)
        return outcome.status


@contextmanager
def statements(db: Database, autocommit: Autocommit | None = None) -> Iterator[Write]:
    """``write(fn)`` runs ``fn(conn)`` and has it committed before returning.

    On PostgreSQL outside a dry run, every ``fn`` given here runs a single statement
    (or one ``Script``: one round trip, one transaction), through ``autocommit`` when given (a Celery worker keeps one across its tasks), else
    through one of its own for the block. Elsewhere — SQLite, and dry runs, whose
    writes are savepoints — each call is its own ``db.transaction()``.
    """
    if db.dry_run or not db.is_postgres:
        def write(fn):
            with db.transaction() as conn:
                return fn(conn)

        yield write
    elif autocommit is not None:
        yield autocommit
    else:
        own = Autocommit(db.engine)
        try:
            yield own
            own.wait()  # the last outcome, committed (or its error raised) before we return
        finally:
            own.close()


class Autocommit:
    """Single statements on one PostgreSQL connection in autocommit mode, opened on
    first use.

    When the server has dropped the connection (a restart, pg_terminate_backend, a
    pooler recycling it — possibly while a message was being sent), the statement runs
    once more on a fresh connection. Every statement given here may be repeated: a
    load only reads; an outcome is fenced on the claim (status and attempts), so a
    repeat after a lost reply changes nothing; a claim repeated after a lost reply
    finds its row taken, and that row is sent after the lease, once, like any
    abandoned claim. Without this, an outcome could be lost after a successful send,
    and the row sent a second time after the lease.
    """

    def __init__(self, engine: sa.Engine):
        self._engine = engine
        self._conn: Connection | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def __call__(self, fn: Callable[[Connection], T]) -> T:
        self.wait()
        return self._call(fn)

    def later(self, fn: Callable[[Connection], object]) -> None:
        """Run ``fn`` as a call would, but in a helper thread, so the caller gets on
        while the server commits. At most one is in flight: every other use of the
        connection — a call, ``later``, ``wait``, ``close`` — waits for it first, so the
        connection is never used by two threads at once and statements commit in the
        order given. Its error, if any, is raised by that wait."""
        self.wait()
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="alerts-autocommit")
        self._pending = self._helper.submit(self._call, fn)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _call(self, fn: Callable[[Connection], T]) -> T:
        for pause in (*RECONNECT_PAUSES_SECONDS, None):
            try:
                return self._run(fn)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                # Lost: the statement's connection dropped, or no new one could be
                # opened (the server restarting, a failover): wait a little, try again.
                if pause is None or not (exc.connection_invalidated or self._conn is None):
                    raise
                log.warning("database connection lost (%s); running the statement again in %ss",
                            type(exc.orig).__name__, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def _run(self, fn: Callable[[Connection], T]) -> T:
        try:
            return fn(self._connection())
        except BaseException:
            self._hand_back()  # whatever state an error left the connection in, it is not reused
            raise

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def close(self) -> None:
        """Wait for a statement still in flight, then hand the connection back."""
        try:
            self.wait()
        except Exception as exc:  # nobody is left to hand it to; it was logged as it retried
            log.error("a statement run in the background failed: %s", exc)
        finally:
            if self._helper is not None:
                self._helper.shutdown()
                self._helper = None
            self._hand_back()

    def _hand_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sa.exc.SQLAlchemyError as exc:  # already broken: nothing left to release
                log.debug("closing a database connection failed: %s", exc)


def claim(write: Write, kind: Kind, claim_rows: Callable[[Connection], list[tuple[int, int]]],
          settings: Settings, channels: ChannelSet) -> list[Job]:
    """Claim rows with ``claim_rows`` (one committed statement), then load and render them.

    The load is a statement of its own, after the claim: only a row's claim shuts
    Phase D out of it, so only a read that starts after the claim sees every item Phase
    D attached. If loading or rendering fails, the claims are given back (the row stays
    queued, the attempt uncounted) before the error goes on.
    """
    table = kind.table()
    claimed = write(claim_rows)
    if not claimed:
        return []
    try:
        return write(lambda conn: kind.load(conn, claimed, settings, channels))
    except BaseException:
        write(lambda conn: _release(conn, table, claimed))
        raise


def _claim_and_load_one(write: Autocommit, kind: Kind, row_id: int, now: datetime, settings: Settings,
                        channels: ChannelSet) -> list[Job]:
    """``claim`` for one row on PostgreSQL, in one round trip instead of two: the claim
    and then the load as one script (``_claim_and_load_script``). Loading runs after the
    claim within it, under a snapshot of its own, so it sees every item Phase D attached
    before the claim shut it out."""
    rows, _ = write(lambda conn: _claim_and_load_script(kind).run(
        conn, {"c_id": row_id, "c_now": now, "timezone": settings.timezone}))
    if not rows:
        return []
    claimed = [(row_id, rows[0]["claimed_attempts"])]
    try:
        return kind.jobs(rows, dict(claimed), settings, channels)
    except BaseException:
        write(lambda conn: _release(conn, kind.table(), claimed))
        raise


@functools.cache
def _claim_and_load_script(kind: Kind) -> Script:
    """The one-row claim, then the row's data — rows only when the claim was ours: it is
    the only write in the script, so a transaction id was assigned exactly when it took
    the row. READ COMMITTED is stated, not assumed: under a database default of
    REPEATABLE READ the load would share the claim's snapshot and miss items committed
    in between."""
    table = kind.table()
    load = (kind.select()
            .add_columns(table.c.attempts.label("claimed_attempts"))
            .where(table.c.id == sa.bindparam("c_id", type_=table.c.id.type),
                   sa.func.txid_current_if_assigned().is_not(None)))
    return Script(f"claim_{kind.label}", _claim_one_statement(kind, True), load,
                  preamble="SET TRANSACTION ISOLATION LEVEL READ COMMITTED")


def _record_outcome(write: Write, kind: Kind, job: Job, outcome: retry.Outcome) -> None:
    """Record the outcome right after its send, one row at a time: batching outcomes
    would widen the "sent, but not recorded" window that a crash turns into a duplicate.

    On an ``Autocommit`` connection the commit runs in its helper thread (``later``)
    while the next message is being sent — or, in a worker, while Celery acks this task
    and fetches the next. At most one outcome is ever in flight, so a crash leaves at
    most one more row sent-but-unrecorded than it would otherwise (each in the window
    SPEC §2.7 allows); the waits for the provider and for the database overlap.
    """
    def fn(conn: Connection) -> None:
        if not record(conn, kind.table(), job, outcome):
            log.warning("%s %s: claim lost before the outcome (%s) was recorded", kind.label, job.id, outcome.status)

    if isinstance(write, Autocommit):
        write.later(fn)
    else:
        write(fn)


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


def _claim_one(conn: Connection, kind: Kind, row_id: int, now: datetime) -> list[tuple[int, int]]:
    """``claim_due`` for one row by id, with a statement built once."""
    rows = conn.execute(_claim_one_statement(kind, is_postgres(conn)), {"c_id": row_id, "c_now": now})
    return [(row.id, row.attempts) for row in rows]


@functools.cache
def _claim_one_statement(kind: Kind, postgres: bool) -> sa.Update:
    table = kind.table()
    now = sa.bindparam("c_now", type_=table.c.claimed_at.type)
    pick = sa.select(table.c.id).where(table.c.status == "queued", table.c.id == sa.bindparam("c_id"),
                                       *kind.due(table, now))
    if postgres:
        pick = pick.with_for_update(skip_locked=True)
    return (sa.update(table)
            .where(table.c.id.in_(pick.scalar_subquery()))
            .values(status="sending", attempts=table.c.attempts + 1, claimed_at=now)
            .returning(table.c.id, table.c.attempts))


def record(conn: Connection, table: sa.Table, job: Job, outcome: retry.Outcome) -> bool:
    """Write the outcome if our claim still stands. A skip gives the attempt back: no
    send was tried."""
    attempts = job.attempts - 1 if outcome.status == "skipped" else job.attempts
    params = {"r_id": job.id, "r_claimed_attempts": job.attempts, "r_status": outcome.status,
              "r_last_error": outcome.last_error, "r_next_retry_at": outcome.next_retry_at,
              "r_sent_at": outcome.sent_at, "r_attempts": attempts}
    if is_postgres(conn) and conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        _, rowcount = _record_script(table).run(conn, params)
        return rowcount == 1
    return conn.execute(_record_statement(table), params).rowcount == 1


@functools.cache
def _record_script(table: sa.Table) -> Script:
    return Script(f"record_{table.name}", _record_statement(table))


@functools.cache
def _record_statement(table: sa.Table) -> sa.Update:
    """``record``'s UPDATE, built once: it runs after every send, and building and
    hashing a fresh statement each time costs more than the database does."""
    def param(name: str, column: sa.Column | None = None) -> sa.BindParameter:
        return sa.bindparam(f"r_{name}", type_=(column if column is not None else table.c[name]).type)

    return (sa.update(table)
            .where(table.c.id == param("id"), table.c.status == "sending",
                   table.c.attempts == param("claimed_attempts", table.c.attempts))
            .values(status=param("status"), last_error=param("last_error"), next_retry_at=param("next_retry_at"),
                    sent_at=param("sent_at"), claimed_at=None, attempts=param("attempts")))


def _release(conn: Connection, table: sa.Table, claimed: list[tuple[int, int]]) -> None:
    """Give back claims that were never sent: queued again, the attempt not counted.
    Fenced like ``record``: a claim someone else has taken over since is left alone."""
    conn.execute(_release_statement(table), [{"r_id": row_id, "r_claimed_attempts": attempts}
                                             for row_id, attempts in claimed])


@functools.cache
def _release_statement(table: sa.Table) -> sa.Update:
    return (sa.update(table)
            .where(table.c.id == sa.bindparam("r_id"), table.c.status == "sending",
                   table.c.attempts == sa.bindparam("r_claimed_attempts", type_=table.c.attempts.type))
            .values(status="queued", attempts=table.c.attempts - 1, claimed_at=None))


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


@functools.cache
def _instant_select() -> sa.Select:
    d, u, e = m.user_alert_deliveries, m.users, m.alert_events
    return (sa.select(d.c.id.label("delivery_id"), d.c.channel, u.c.is_active,
                      u.c.email, u.c.telegram_chat_id, u.c.phone,
                      e.c.id, e.c.event_key, e.c.alert_type, e.c.region, e.c.severity, e.c.title,
                      e.c.summary, e.c.url, e.c.created_at)
            .select_from(d.join(u, u.c.id == d.c.user_id).join(e, e.c.id == d.c.alert_event_id))
            .order_by(d.c.id))


def _instant_jobs(rows: Sequence[Mapping], attempts: dict[int, int], settings: Settings,
                  channels: ChannelSet) -> list[Job]:
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


INSTANT = Kind("instant", lambda: m.user_alert_deliveries, _due_instant, _instant_select, _instant_jobs)


# --- digests ------------------------------------------------------------------------------

def _due_digest(table: sa.Table, now: datetime) -> list:
    return [table.c.next_retry_at <= now]


_EVENT_KEYS = ("id", "event_key", "alert_type", "region", "severity", "title", "summary", "url", "created_at")


@functools.cache
def _digest_select() -> sa.Select:
    """One row per item (a digest without items: one row, its event columns null)."""
    g, i, d, u, e = (m.user_alert_digests, m.user_alert_digest_items, m.user_alert_deliveries,
                     m.users, m.alert_events)
    return (sa.select(g.c.id.label("digest_id"), g.c.digest_key, g.c.channel, g.c.period, g.c.window_start,
                      g.c.window_end, u.c.is_active, u.c.email, u.c.telegram_chat_id, u.c.phone,
                      sa.func.coalesce(u.c.timezone, sa.bindparam("timezone", type_=sa.Text)).label("timezone"),
                      *(e.c[key] for key in _EVENT_KEYS))
            .select_from(g.join(u, u.c.id == g.c.user_id)
                         .outerjoin(i, i.c.digest_id == g.c.id)
                         .outerjoin(d, d.c.id == i.c.delivery_id)
                         .outerjoin(e, e.c.id == d.c.alert_event_id))
            .order_by(g.c.id))


def _digest_jobs(rows: Sequence[Mapping], attempts: dict[int, int], settings: Settings,
                 channels: ChannelSet) -> list[Job]:
    digests: dict[int, tuple[Mapping, list[dict]]] = {}
    for row in rows:
        _, items = digests.setdefault(row["digest_id"], (row, []))
        if row["id"] is not None:
            items.append({key: row[key] for key in _EVENT_KEYS})
    jobs = []
    for digest_id, (digest, items) in digests.items():
        job = Job(digest_id, attempts[digest_id], digest["channel"])
        _address(job, digest, channels)
        if not items:
            job.skip_reason = "digest has no items"
        if job.skip_reason is None and channels.get(job.channel) is not None:
            job.message = render_digest(job.channel, digest, items, settings=settings)
        jobs.append(job)
    return jobs


DIGEST = Kind("digests", lambda: m.user_alert_digests, _due_digest, _digest_select, _digest_jobs)
