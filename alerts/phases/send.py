"""Phase C — send due instant deliveries, then due digests (SPEC §4 C).

One path, used by the runner's Phase C (a batch at a time) and by the Celery send tasks
(one row at a time), ``send_claimed``:

1. **claim and load**, in one committed transaction: the claim (``outbox.claim``) takes
   the rows — only one process can win a row — and counts the attempt; the load
   (``outbox.load``), a statement after it, reads what the sends need, so it sees every
   digest item Phase D committed before the claim shut it out. If rendering fails, the
   claim is rolled back with it;
2. **send** each job outside any transaction (``attempt``);
3. **record** its outcome in a transaction of its own, committed before the next send
   starts and before a task returns — so before Celery acks it. A dropped database
   connection is ridden out (``db.retrying``): an outcome lost after a send would leave
   the row in ``sending``, to be sent again after the lease.

Destination health (SPEC §11.3-11.4): a row whose destination is blocked is skipped by
the load, without a send. A provider answer that the destination is gone records the
block in the transaction of the row's ``failed`` outcome (``blocks.record``; then
``outbox.skip_queued`` skips the user's other queued rows on the channel), and the rest of the batch for that
destination is skipped too. A Telegram group that became a supergroup gets its new chat
id stored and the message sent there at once, within the same attempt.

The clock is the run's (``alerts.core.clock``): claims, ``sent_at``, backoff and the
half-lease budget are read from it at the moment they happen.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa

from alerts.sending import blocks
from alerts.core import tables as m
from alerts.sending import outbox as ob
from alerts.sending import retry
from alerts.channels import DeliveryError
from alerts.channels.registry import ChannelSet
from alerts.core.clock import Clock
from alerts.core.settings import Settings
from alerts.core.db import Database, retrying
from alerts.sending.outbox import Job, Outbox

log = logging.getLogger(__name__)


@dataclass
class SendCounts:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, outcome: retry.Outcome) -> None:
        key = "retried" if outcome.status == m.QUEUED else outcome.status
        setattr(self, key, getattr(self, key) + 1)

    def as_dict(self) -> dict:
        return {"sent": self.sent, "retried": self.retried, "failed": self.failed, "skipped": self.skipped}


def run_phase_c(db: Database, clock: Clock, settings: Settings, channels: ChannelSet) -> dict:
    """Recover abandoned sends, then send every due instant delivery, then every due digest."""
    recover_stale(db, clock, settings)
    return {outbox.name: send_due(db, outbox, clock, settings, channels).as_dict() for outbox in ob.OUTBOXES}


def send_due(db: Database, outbox: Outbox, clock: Clock, settings: Settings, channels: ChannelSet,
             rng: random.Random | None = None) -> SendCounts:
    """Claim due rows a batch at a time and send them until none are due."""
    counts = SendCounts()
    while not clock.out_of_time() and (
            outcomes := send_claimed(db, outbox, clock, settings, channels, limit=settings.send_batch_size, rng=rng)):
        for outcome in outcomes:
            counts.add(outcome)
    if clock.out_of_time():
        log.warning("time limit of %ss reached: no more %s sends in this run", clock.limit_seconds, outbox.name)
    return counts


def send_one(db: Database, outbox: Outbox, row_id: int, clock: Clock, settings: Settings,
             channels: ChannelSet, rng: random.Random | None = None) -> str | None:
    """Claim and send one row (the Celery send tasks). The outcome's status, or None when
    the row was not due or another process had claimed it."""
    outcomes = send_claimed(db, outbox, clock, settings, channels, limit=1, row_id=row_id, rng=rng)
    return outcomes[0].status if outcomes else None


def send_claimed(db: Database, outbox: Outbox, clock: Clock, settings: Settings, channels: ChannelSet, *,
                 limit: int, row_id: int | None = None, rng: random.Random | None = None) -> list[retry.Outcome]:
    """Claim up to ``limit`` due rows (or ``row_id``), send them, record each outcome.
    Returns the outcomes of the sends made; empty when nothing was claimed.

    A batch whose sends outlast half the lease (a slow provider) gives its unsent rows
    back: the next claim takes them afresh, so no claim of ours ever ages into another
    process's lease recovery — and is sent twice — while we still hold it. So does a run
    whose time limit has passed (``--max-seconds``): the send in progress is finished and
    recorded, the rest go back to ``queued`` as they were.
    """
    jobs = _claim_and_load(db, outbox, clock, settings, channels, limit, row_id)
    give_back_at = clock.now() + timedelta(seconds=settings.sending_lease_seconds / 2)
    gone: dict[tuple[int, str, str | None], str] = {}  # destinations blocked during this batch
    outcomes = []
    for n, job in enumerate(jobs):
        if (n and clock.now() > give_back_at) or clock.out_of_time():
            _release(db, outbox, [j.claim for j in jobs[n:]])
            break
        if (reason := gone.get(_destination(job))) is not None and not job.skip_reason:
            job.skip_reason = m.destination_disabled(reason)  # loaded before its block
        outcome = attempt(job, clock, settings, channels, rng,
                          on_migrate=lambda old, new: _migrate_chat(db, jobs[n:], old, new))
        retrying(lambda: _record(db, outbox, job, outcome, clock), f"recording {outbox.name} {job.id}")
        if outcome.gone:
            gone[_destination(job)] = outcome.last_error
        outcomes.append(outcome)
    return outcomes


def _destination(job: Job) -> tuple[int, str, str | None]:
    return job.user_id, job.channel, job.recipient


def _claim_and_load(db: Database, outbox: Outbox, clock: Clock, settings: Settings, channels: ChannelSet,
                    limit: int, row_id: int | None) -> list[Job]:
    # One transaction: if loading or rendering fails (a bug, a template), the claim is
    # rolled back with it — the row stays queued, no attempt counted.
    with db.transaction() as conn:
        claimed = outbox.claim(conn, clock.now(), limit, row_id=row_id)
        return outbox.load(conn, claimed, settings, channels) if claimed else []


def _record(db: Database, outbox: Outbox, job: Job, outcome: retry.Outcome, clock: Clock) -> None:
    with db.transaction() as conn:
        if outbox.record(conn, job, outcome) and outcome.gone:
            blocks.record(conn, job.user_id, job.channel, job.recipient, outcome.last_error, clock.now())
            skipped = sum(ob.skip_queued(conn, job.user_id, job.channel, m.destination_disabled(outcome.last_error),
                                         blocks.address_unchanged(job.user_id, job.channel, job.recipient),
                                         digest_deliveries=False).values())
            log.warning("user %s %s blocked (%s); %d queued row(s) skipped", job.user_id, job.channel,
                        outcome.last_error, skipped)


def _migrate_chat(db: Database, jobs: list[Job], old: str, new: str) -> None:
    """A group became a supergroup: store its new chat id (where the user still has the old
    one), and send this batch's other messages for the chat there too."""
    user_id = jobs[0].user_id
    u = m.users

    def store() -> None:
        with db.transaction() as conn:
            conn.execute(sa.update(u).where(u.c.id == user_id, sa.func.trim(u.c.telegram_chat_id) == old)
                         .values(telegram_chat_id=new))

    retrying(store, f"storing the new chat id of user {user_id}")
    log.warning("user %s: telegram chat %s moved to %s", user_id, old, new)
    for job in jobs:
        if (job.user_id, job.channel, job.recipient) == (user_id, "telegram", old):
            job.recipient = new


def _release(db: Database, outbox: Outbox, claimed: list[ob.Claim]) -> None:
    with db.transaction() as conn:
        outbox.release(conn, claimed)


def attempt(job: Job, clock: Clock, settings: Settings, channels: ChannelSet,
            rng: random.Random | None = None, on_migrate=None) -> retry.Outcome:
    """Send one job; what became of it. A Telegram chat that moved (``migrate_to``) is
    handed to ``on_migrate(old, new)`` — which points ``job`` at the new chat — and sent
    again at once, within the same attempt; a second move in one attempt fails it."""
    if job.skip_reason:
        return retry.skipped(job.skip_reason)
    channel = channels.get(job.channel)
    if channel is None:
        return retry.skipped(channels.unconfigured_reason(job.channel))
    try:
        channel.send(job.recipient, job.message)
    except DeliveryError as exc:
        if exc.migrate_to is not None and on_migrate is not None:
            old = job.recipient
            on_migrate(old, exc.migrate_to)
            job.recipient = exc.migrate_to
            log.info("%s send %s: chat %s moved to %s; sending there", job.channel, job.id, old, exc.migrate_to)
            return attempt(job, clock, settings, channels, rng)
        outcome = retry.after_failure(exc, job.attempts, clock.now(), settings, rng)
        log.info("%s send %s failed (%s): %s", job.channel, job.id, outcome.status, exc.reason)
        return outcome
    return retry.sent(clock.now())


def recover_stale(db: Database, clock: Clock, settings: Settings) -> dict[str, int]:
    """Rows abandoned in ``sending`` past the lease back in the queue (``outbox.recover``)."""
    with db.transaction() as conn:
        return ob.recover(conn, clock.now(), settings)
