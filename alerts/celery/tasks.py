"""Celery tasks (docs/deployment.md): thin shells over the phases, the outbox and the dispatch.

Arguments are JSON only — row ids and, for tests and debugging, an optional ``now``
(ISO-8601 with offset, the start of the task's clock) — so
``celery -A celery_app call NAME --args '[…]'`` works.

Two layers of retry:
- a failed *send* is recorded on its row (status, attempts, ``next_retry_at``) and
  picked up again by a later dispatch — the database is the truth;
- Celery's ``autoretry_for`` covers only infrastructure trouble (database or broker
  unreachable), a bounded number of times with short, jittered countdowns.
"""
from __future__ import annotations

import logging

import kombu.exceptions
import redis.exceptions
import sqlalchemy as sa
from celery import Task, shared_task

from alerts.sending import dispatch
from alerts.celery import instant_path
from alerts.core.clock import Clock, parse_instant
from alerts.core.settings import INFRA_BACKOFF_MAX_SECONDS
from alerts.sending.outbox import DIGESTS, INSTANT, Outbox
from alerts.sending.service import recover_stale as recover_rows, send_one
from alerts.phases.pipeline import ALL, run_phases
from alerts.celery.worker import state

log = logging.getLogger(__name__)

INFRASTRUCTURE_ERRORS = (
    sa.exc.OperationalError,  # database unreachable, connection dropped, deadlock
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    kombu.exceptions.OperationalError,  # broker unreachable while publishing
    redis.exceptions.ConnectionError,  # the rate limiter's Redis
    redis.exceptions.TimeoutError,
)


class AlertsTask(Task):
    """Base of every task: late ack, no result, retries for infrastructure errors only."""

    acks_late = True
    ignore_result = True
    autoretry_for = INFRASTRUCTURE_ERRORS
    max_retries = 5
    retry_backoff = 2
    retry_backoff_max = INFRA_BACKOFF_MAX_SECONDS
    retry_jitter = True


def clock_for(now: str | None) -> Clock:
    """The task's clock: from ``now`` when given, else the wall clock."""
    return Clock(parse_instant(now) if now else None)


def _run(letters: str, clock: Clock) -> dict:
    if letters != "all" and (not letters or set(letters) - set(ALL)):
        raise ValueError(f"phases must be 'all' or letters from {''.join(ALL)} (got {letters!r})")
    phases = ALL if letters == "all" else tuple(letters)
    results = run_phases(state.db(), phases, clock, state.settings, state.channels())
    log.info("phases %s: %s", letters, results)
    return results


def _publish(task: Task, outbox: Outbox, send_task: str, clock: Clock, now: str | None, **options) -> int:
    """Send tasks for ``outbox``'s rows due by the task's clock. A task given ``now``
    hands its clock's time on to them, so a test or a replay runs on one timeline."""
    at = clock.now()
    return dispatch.publish_due(task.app, state.db(), outbox, send_task, at, state.settings,
                                pass_on=at.isoformat() if now else None, **options)


# --- phases ------------------------------------------------------------------------------

@shared_task(name="alerts.intake", base=AlertsTask)
def intake(now: str | None = None) -> dict:
    return _run("a", clock_for(now))["a"]


@shared_task(name="alerts.fanout", base=AlertsTask)
def fanout(now: str | None = None) -> dict:
    return _run("b", clock_for(now))["b"]


@shared_task(name="alerts.run_pipeline", base=AlertsTask)
def run_pipeline(now: str | None = None, phases: str = "all") -> dict:
    """A → B → D → C in one task (``phases`` picks some, e.g. "ab" for beat's intake)."""
    return _run(phases, clock_for(now))


@shared_task(name="alerts.build_digests", base=AlertsTask, bind=True)
def build_digests(self, now: str | None = None) -> dict:
    """Phase D (committed), then one alerts.send_digest per due digest."""
    clock = clock_for(now)
    result = _run("d", clock)
    result["enqueued"] = _publish(self, DIGESTS, "alerts.send_digest", clock, now)
    return result


@shared_task(name="alerts.dispatch_deliveries", base=AlertsTask, bind=True)
def dispatch_deliveries(self, now: str | None = None) -> dict:
    """One alerts.send_delivery per due instant delivery."""
    return {"enqueued": _publish(self, INSTANT, "alerts.send_delivery", clock_for(now), now)}


@shared_task(name="alerts.recover_stale", base=AlertsTask, bind=True)
def recover_stale(self, now: str | None = None) -> dict:
    """Put rows abandoned in ``sending`` past the lease back in the queue, and enqueue
    them right away instead of waiting for the next dispatch tick."""
    clock = clock_for(now)
    recovered = recover_rows(state.db(), clock, state.settings)
    enqueued = {}
    if any(recovered.values()):
        enqueued = {outbox.name: _publish(self, outbox, task, clock, now)
                    for outbox, task in ((INSTANT, "alerts.send_delivery"), (DIGESTS, "alerts.send_digest"))}
    return {"recovered": recovered, "enqueued": enqueued}


# An event that cannot be stored fails its task: "expected" (``throws``), so Celery logs
# it at INFO without a traceback, next to the one ERROR line of our own; never retried.
@shared_task(name="alerts.ingest_event", base=AlertsTask, bind=True, throws=(instant_path.MalformedEvent,))
def ingest_event(self, event: dict, now: str | None = None) -> dict:
    """Store one event (a repeated event_key is a no-op), then judge it, fan it out and
    publish its due instant sends at once (alerts/celery/instant_path.py)."""
    clock = clock_for(now)
    try:
        result = instant_path.store_and_fan_out(state.db(), event, clock, state.settings)
    except instant_path.MalformedEvent as exc:
        log.error("alerts.ingest_event: %s not stored: %s", instant_path.named(event), exc)
        raise
    if result["status"] == "ready" and self.request.retries < instant_path.PENDING_RETRIES:
        raise self.retry(countdown=instant_path.PENDING_RETRY_SECONDS, max_retries=instant_path.PENDING_RETRIES)
    result["enqueued"] = _publish(self, INSTANT, "alerts.send_delivery", clock, now,
                                  where=instant_path.deliveries_of(result["event_id"]),
                                  first_chunk_queue=self.app.conf.task_default_queue)
    return result


# --- sends -------------------------------------------------------------------------------

@shared_task(name="alerts.send_digest", base=AlertsTask, bind=True)
def send_digest(self, digest_id: int, now: str | None = None, slot: str | None = None,
                locked: int = 0) -> str | None:
    return _send(self, DIGESTS, digest_id, now, slot, locked)


@shared_task(name="alerts.send_delivery", base=AlertsTask, bind=True)
def send_delivery(self, delivery_id: int, now: str | None = None, slot: str | None = None,
                  locked: int = 0) -> str | None:
    return _send(self, INSTANT, delivery_id, now, slot, locked)


# A send task whose row another transaction held looks again this soon, this many times
# (about ten minutes in all), so a due row goes out within seconds of the lock's release.
LOCKED_RETRY_SECONDS = (1, 2, 4, 8, 15, 30)
LOCKED_RETRIES = 25


def _send(task: Task, outbox: Outbox, row_id: int, now: str | None, slot: str | None, locked: int) -> str | None:
    """Claim, send, record through the one send path (alerts/sending/service.py): the
    outcome's status; None when the row was not due or someone else had it;
    "rate_limited" when the task was put back to wait for the Telegram limit; "locked"
    when another transaction held the due row and the task will look again shortly.

    ``slot`` is set only by the task itself when it re-schedules: what it booked of the
    limit before sleeping (``service.CHAT_SLOT``, ``service.BOTH_SLOTS``).
    """
    clock = clock_for(now)
    sent = send_one(state.db(), outbox, row_id, clock, state.settings, state.channels(), slot=slot)
    if sent.deferred is not None:
        # The claim is given back (no attempt counted) and the row's mark moved to when
        # this task wakes, so no second task is published for it meanwhile.
        task.apply_async(task.request.args, {**(task.request.kwargs or {}), "slot": sent.deferred.slot},
                         countdown=sent.deferred.wait)
        return "rate_limited"
    if sent.locked and locked < LOCKED_RETRIES:
        countdown = LOCKED_RETRY_SECONDS[min(locked, len(LOCKED_RETRY_SECONDS) - 1)]
        task.apply_async(task.request.args, {**(task.request.kwargs or {}), "locked": locked + 1}, countdown=countdown)
        return "locked"
    return sent.status
