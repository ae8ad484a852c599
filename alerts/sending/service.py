"""The one send path: claim → load → ask → send → record. The runner's Phase C (a batch
at a time) and the Celery send tasks (one row at a time) both send through
``send_claimed``; how it keeps every message to at most one send is
docs/architecture.md, "How a send works".

1. **claim, then load**, each one autocommitted statement (``Database.run``): the claim
   (``outbox.claim``) takes the rows — only one process can win a row — and counts the
   attempt; the load (``outbox.load``), after the claim committed, reads what the sends
   need, so it sees every digest item Phase D committed before the claim shut it out. A
   message that cannot be built fails its own row (``internal error: <type>``), never
   the batch;
2. **ask**, before each send, what a send must ask first: whether the user unsubscribed
   or the destination was blocked since the batch was loaded (``outbox.recheck``, for
   every job after the first of a batch), and, for Telegram, the rate limiter
   (``channels.limiter``: alerts/sending/ratelimit.py). A wait is slept through when the
   caller can sleep (the runner), else the claim is given back and the caller told how
   long to wait (a Celery task re-schedules itself);
3. **send** outside any transaction (``attempt``). An exception that is not a provider's
   answer fails that row with ``internal error: <type>`` (traceback logged);
4. **record** the outcome, one statement fenced on the claim (a transaction when a block
   is recorded with it), committed before the next send starts and before a task
   returns — so before Celery acks it. A dropped database connection is ridden out
   (``db.retrying``).

A digest sent by a Celery task thus costs three round trips to the database (claim,
load, record); a Telegram row that must wait for the limit, one more (the release).

Whatever happens, no claim of this batch is left in ``sending``: rows not sent go back
to ``queued`` as they were (no attempt counted) — also when the batch outlasts half the
lease (so no claim of ours ages into another process's lease recovery while we hold
it) or the run's ``--max-seconds``.

Destination health: a provider answer that the destination is gone records the block
in the transaction of the row's ``failed`` outcome and skips the user's other queued
rows on the channel; the rest of the batch for that destination is skipped too. A
Telegram group that became a supergroup gets its new chat id stored and the message
sent there at once, within the same attempt.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import sqlalchemy as sa

from alerts.channels import DeliveryError
from alerts.channels.registry import ChannelSet
from alerts.core import tables as m
from alerts.core.clock import Clock
from alerts.core.db import Database, retrying
from alerts.core.settings import MAX_COUNTDOWN_SECONDS, Settings
from alerts.sending import blocks, retry
from alerts.sending import outbox as ob
from alerts.sending.outbox import Job, Outbox
from alerts.sending.ratelimit import take_slot

log = logging.getLogger(__name__)

# Slot names a re-scheduled Celery send task carries (alerts/sending/ratelimit.py):
CHAT_SLOT = "chat"  # it booked its chat's next free second and must still ask for a global one
BOTH_SLOTS = "both"  # it booked both and may send on waking without asking again


@dataclass(frozen=True)
class Deferred:
    """The send must wait ``wait`` seconds for the Telegram limit; its claim was given
    back. ``slot`` is what it booked meanwhile (None, CHAT_SLOT or BOTH_SLOTS)."""

    wait: float
    slot: str | None


@dataclass
class Sent:
    """What ``send_claimed`` did: one outcome per send made, and a deferral if one had to wait."""

    outcomes: list[retry.Outcome] = field(default_factory=list)
    deferred: Deferred | None = None
    locked: bool = False  # a one-row send found its row due but held by another transaction

    @property
    def status(self) -> str | None:
        """The first outcome's status (a one-row send's), None when nothing was sent."""
        return self.outcomes[0].status if self.outcomes else None


def send_claimed(db: Database, outbox: Outbox, clock: Clock, settings: Settings, channels: ChannelSet, *,
                 limit: int, row_id: int | None = None, slot: str | None = None,
                 sleep: Callable[[float], None] | None = None, rng: random.Random | None = None) -> Sent:
    """Claim up to ``limit`` due rows (or ``row_id``), send them, record each outcome.

    ``sleep``: how to wait for the Telegram limit (the runner); without it (a Celery
    task) a send that must wait gives its claim back and the rest of the batch too, and
    the result says how long (``Sent.deferred``). ``slot``: what a re-scheduled task
    booked before (see ``Deferred``).
    """
    jobs = _claim_and_load(db, outbox, clock, settings, channels, limit, row_id)
    give_back_at = clock.now() + timedelta(seconds=settings.sending_lease_seconds / 2)
    gone: dict[tuple[int, str, str | None], str] = {}  # destinations blocked during this batch
    result = Sent()
    untouched = 0  # jobs[untouched:] are still claimed and not yet tried: given back at the end
    try:
        for n, job in enumerate(jobs):
            if (n and clock.now() > give_back_at) or clock.out_of_time():
                break
            if n and not job.skip_reason:  # loaded earlier in the batch: ask again
                job.skip_reason = gone.get(_destination(job)) or retrying(
                    lambda: _recheck(db, outbox, job), f"rechecking {outbox.name} {job.id}")
            if (deferred := _ask_limiter(job, channels, slot, sleep, _may_sleep(clock, give_back_at))) is not None:
                until = clock.now() + timedelta(seconds=deferred.wait)
                untouched = n + 1
                if sleep is None:  # a task re-schedules itself: hold its mark, not the row
                    _release(db, outbox, [job.claim], hold_until=until)
                    result.deferred = deferred
                    break
                _release(db, outbox, [job.claim], due_at=until)
                continue
            untouched = n + 1  # from here on the provider may have it: never given back
            outcome = attempt(job, clock, settings, channels, rng,
                              on_migrate=lambda old, new: _migrate_chat(db, jobs[n:], old, new))
            retrying(lambda: _record(db, outbox, job, outcome, clock), f"recording {outbox.name} {job.id}")
            if outcome.gone:
                gone[_destination(job)] = m.destination_disabled(outcome.last_error)
            result.outcomes.append(outcome)
    finally:
        if rest := [j.claim for j in jobs[untouched:]]:
            _release(db, outbox, rest)
    return result


def send_one(db: Database, outbox: Outbox, row_id: int, clock: Clock, settings: Settings,
             channels: ChannelSet, *, slot: str | None = None, rng: random.Random | None = None) -> Sent:
    """Claim and send one row (the Celery send tasks): no outcome when the row was not
    due or another process had it; ``deferred`` when it must wait for the Telegram limit;
    ``locked`` when it is due but another transaction holds it (a claim skips locked
    rows), so the caller can look again soon instead of leaving it to the re-enqueue age."""
    sent = send_claimed(db, outbox, clock, settings, channels, limit=1, row_id=row_id, slot=slot, rng=rng)
    if not sent.outcomes and sent.deferred is None:
        sent.locked = db.run(lambda conn: outbox.waiting(conn, row_id, clock.now()))
    return sent


def _destination(job: Job) -> tuple[int, str, str | None]:
    return job.user_id, job.channel, job.recipient


def _claim_and_load(db: Database, outbox: Outbox, clock: Clock, settings: Settings, channels: ChannelSet,
                    limit: int, row_id: int | None) -> list[Job]:
    """The claim, committed on its own, then the load: two statements, a round trip each.
    The load runs after the claim committed, so it sees every digest item Phase D
    committed before the claim shut it out. A load that fails gives the claims back."""
    claimed = db.run(lambda conn: outbox.claim(conn, clock.now(), limit, row_id=row_id))
    if not claimed:
        return []
    try:
        return db.run(lambda conn: outbox.load(conn, claimed, settings, channels))
    except BaseException:
        _release(db, outbox, claimed)
        raise


def _recheck(db: Database, outbox: Outbox, job: Job) -> str | None:
    return db.run(lambda conn: outbox.recheck(conn, job))


def _may_sleep(clock: Clock, give_back_at) -> float:
    """How long a batch may still wait for the Telegram limit: never past half the lease
    (a claim slept on longer could be recovered by another process and sent twice), nor
    past the run's time limit."""
    left = (give_back_at - clock.now()).total_seconds()
    if clock.limit_seconds is not None:
        left = min(left, clock.limit_seconds - clock.elapsed())
    return max(left, 0.0)


def _ask_limiter(job: Job, channels: ChannelSet, slot: str | None,
                 sleep: Callable[[float], None] | None, may_sleep: float) -> Deferred | None:
    """None when the job may go now (waiting here first, when we can sleep and the wait
    fits in ``may_sleep`` seconds); else how long it must wait. Only a Telegram message
    that will really be sent asks."""
    limiter = channels.limiter
    if limiter is None or job.channel != "telegram" or job.message is None or job.skip_reason or slot == BOTH_SLOTS:
        return None
    permit = take_slot(limiter, job.recipient, chat_held=slot == CHAT_SLOT, sleep=sleep, may_sleep=may_sleep,
                       max_reserve=MAX_COUNTDOWN_SECONDS)
    if permit is None:
        return None
    held = BOTH_SLOTS if permit.go else CHAT_SLOT if permit.chat_held else None
    return Deferred(min(permit.wait, MAX_COUNTDOWN_SECONDS), held)


def _record(db: Database, outbox: Outbox, job: Job, outcome: retry.Outcome, clock: Clock) -> None:
    """One statement (fenced on the claim: safe to run again), or, when the destination is
    gone, one transaction that also records the block and skips what waits for it."""
    if not outcome.gone:
        db.run(lambda conn: outbox.record(conn, job, outcome))
        return
    with db.transaction() as conn:
        if outbox.record(conn, job, outcome):
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


def _release(db: Database, outbox: Outbox, claimed: list[ob.Claim], **hold) -> None:
    retrying(lambda: db.run(lambda conn: outbox.release(conn, claimed, **hold)),
             f"giving back {len(claimed)} {outbox.name} claim(s)")


def attempt(job: Job, clock: Clock, settings: Settings, channels: ChannelSet,
            rng: random.Random | None = None, on_migrate=None) -> retry.Outcome:
    """Send one job; what became of it. A Telegram chat that moved (``migrate_to``) is
    handed to ``on_migrate(old, new)`` — which points ``job`` at the new chat — and sent
    again at once, within the same attempt; a second move in one attempt fails it."""
    if job.skip_reason:
        return retry.skipped(job.skip_reason)
    if job.error:
        return retry.failed(job.error)
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
    except Exception as exc:  # noqa: BLE001 — not a provider's answer: our bug, this row's alone
        log.exception("%s send %s: unexpected error", job.channel, job.id)
        return retry.failed(ob.internal_error(exc))
    return retry.sent(clock.now())


def recover_stale(db: Database, clock: Clock, settings: Settings) -> dict[str, int]:
    """Rows abandoned in ``sending`` past the lease back in the queue (``outbox.recover``)."""
    with db.transaction() as conn:
        return ob.recover(conn, clock.now(), settings)
