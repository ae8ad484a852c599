"""Celery tasks (SPEC §8): thin shells over the phase functions.

Arguments are JSON only — row ids and, for tests and debugging, an optional ``now``
(ISO-8601 with offset) — so ``celery -A celery_app call NAME --args '[…]'`` works.

Two layers of retry:
- a failed *send* is recorded on its row by ``send_one`` (status, attempts,
  ``next_retry_at``) and picked up again by a later dispatch — the DB is the truth;
- Celery's ``autoretry_for`` covers only infrastructure trouble (database or broker
  unreachable), a bounded number of times with short, jittered countdowns.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import kombu.exceptions
import redis.exceptions
import sqlalchemy as sa
from celery import Task, shared_task
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown

from alerts import dispatch
from alerts.channels.registry import ChannelSet, build_channels
from alerts.config import Settings
from alerts.db import Database, check_migrated, make_engine
from alerts.phases.send import DIGEST, INSTANT, Autocommit, Kind, recover_stale as recover_stale_rows, send_one
from alerts.pipeline import ALL, run_phases
from alerts.ratelimit import TelegramLimiter

log = logging.getLogger(__name__)

INFRASTRUCTURE_ERRORS = (
    sa.exc.OperationalError,  # database unreachable, connection dropped, deadlock
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    kombu.exceptions.OperationalError,  # broker unreachable while publishing
    redis.exceptions.ConnectionError,  # the rate limiter's Redis
    redis.exceptions.TimeoutError,
)
INFRA_MAX_RETRIES = 5
INFRA_BACKOFF_MAX_SECONDS = 60  # far below any visibility timeout we accept
# The longest countdown a task ever sets on itself (a booked rate-limit slot); longer
# waits live in next_retry_at, never in the broker.
MAX_COUNTDOWN_SECONDS = 60
DEFAULT_REENQUEUE_AFTER_SECONDS = 600
REDIS_TIMEOUT_SECONDS = 5.0
# The send tasks' database connection is kept between tasks; after this long unused it
# is handed back, and the next task takes one from the pool (whose ping catches a
# connection the server dropped meanwhile).
CONNECTION_IDLE_SECONDS = 30.0
# What a parent process had open before the fork: kept referenced and never used or
# closed in the child (closing it would end the parent's session on the shared socket).
_inherited_connections: list = []


class AlertsTask(Task):
    """Base of every task: late ack, no result, retries for infrastructure errors only."""

    acks_late = True
    ignore_result = True
    autoretry_for = INFRASTRUCTURE_ERRORS
    max_retries = INFRA_MAX_RETRIES
    retry_backoff = 2
    retry_backoff_max = INFRA_BACKOFF_MAX_SECONDS
    retry_jitter = True


# --- what one worker process keeps between tasks ---------------------------------------

class _ThreadState:
    """What one task-running thread keeps: its autocommit connection and its channels
    (an SMTP connection is one conversation at a time)."""

    def __init__(self):
        self.statements: Autocommit | None = None
        self.statements_used = 0.0
        self.channels: ChannelSet | None = None

    def close(self) -> None:
        if self.statements is not None:
            self.statements.close()
        if self.channels is not None:
            self.channels.close()
        self.statements = self.channels = None


class WorkerState:
    """One engine and one rate limiter per worker process; per thread that runs tasks
    (one with the solo and prefork pools, ``--concurrency`` with ``--pool threads``)
    one database connection for the send tasks and one set of channels (an SMTP
    connection reused across sends). All created on first use."""

    def __init__(self):
        self.settings: Settings | None = None
        self._engine = None
        self._limiter: TelegramLimiter | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._threads: list[_ThreadState] = []

    def configure(self, settings: Settings | None = None, limiter: TelegramLimiter | None = None) -> None:
        """Start over with these (tests); None ⇒ from the environment on first use."""
        self.close()
        self.settings, self._limiter = settings, limiter

    def get_settings(self) -> Settings:
        if self.settings is None:
            self.settings = Settings.from_env()  # celery_app validated it at start
        return self.settings

    def db(self) -> Database:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    engine = make_engine(self.get_settings().database_url)
                    try:
                        check_migrated(engine)
                    except BaseException:
                        engine.dispose()
                        raise
                    self._engine = engine
        return Database(self._engine)

    def _mine(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadState()
            with self._lock:
                self._threads.append(state)
        return state

    def send_statements(self) -> Autocommit | None:
        """This thread's autocommit connection for the send tasks (None off
        PostgreSQL): saves each task a pool checkout, its ping and two isolation-level
        switches. After a long idle spell it is handed back and the next task takes a
        pinged one."""
        db = self.db()
        if not db.is_postgres:
            return None
        mine = self._mine()
        if mine.statements is None:
            mine.statements = Autocommit(db.engine)
        elif time.monotonic() - mine.statements_used > CONNECTION_IDLE_SECONDS:
            mine.statements.close()
        mine.statements_used = time.monotonic()
        return mine.statements

    def channels(self) -> ChannelSet:
        mine = self._mine()
        if mine.channels is None:
            mine.channels = build_channels(self.get_settings())
        return mine.channels

    def limiter(self, app) -> TelegramLimiter | None:
        """None when there is no Redis to share a limit in (a non-Redis broker and no
        ALERTS_RATELIMIT_REDIS_URL): Telegram's 429s are then retried via next_retry_at."""
        if self._limiter is None:
            url = app.conf.get("alerts_ratelimit_redis_url")
            if not url:
                return None
            self._limiter = TelegramLimiter(redis.Redis.from_url(
                url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS))
        return self._limiter

    def forget(self) -> None:
        """After a fork: drop what the parent opened without closing it under the parent."""
        with self._lock:
            for state in self._threads:
                if state.statements is not None:
                    _inherited_connections.append(state.statements)
            self._threads = []
        self._local = threading.local()
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._engine = None
        self._limiter = None

    def close(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, []
        for state in threads:
            state.close()
        self._local = threading.local()
        if self._engine is not None:
            self._engine.dispose()
        self._engine = None
        self._limiter = None


worker = WorkerState()


@worker_process_init.connect
def _after_fork(**_):
    worker.forget()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _on_shutdown(**_):
    worker.close()


def parse_now(value: str | None) -> datetime:
    """``now`` for a task: the clock, or an ISO-8601 instant with an offset."""
    if not value:
        return datetime.now(timezone.utc)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"now needs a UTC offset, e.g. 2026-05-13T00:01:00+00:00 (got {value!r})")
    return parsed.astimezone(timezone.utc)


def _phases(letters: str) -> tuple[str, ...]:
    if letters == "all":
        return ALL
    unknown = set(letters) - set(ALL)
    if unknown or not letters:
        raise ValueError(f"phases must be 'all' or letters from {''.join(ALL)} (got {letters!r})")
    return tuple(letters)


def _run(phases: str, now: str | None) -> dict:
    results = run_phases(worker.db(), _phases(phases), parse_now(now), worker.get_settings(), worker.channels())
    log.info("phases %s: %s", phases, results)
    return results


# --- phases ------------------------------------------------------------------------------

@shared_task(name="alerts.intake", base=AlertsTask)
def intake(now: str | None = None) -> dict:
    return _run("a", now)["a"]


@shared_task(name="alerts.fanout", base=AlertsTask)
def fanout(now: str | None = None) -> dict:
    return _run("b", now)["b"]


@shared_task(name="alerts.run_pipeline", base=AlertsTask)
def run_pipeline(now: str | None = None, phases: str = "all") -> dict:
    """A → B → D → C in one task (``phases`` picks some, e.g. "ab" for beat's intake)."""
    return _run(phases, now)


@shared_task(name="alerts.build_digests", base=AlertsTask, bind=True)
def build_digests(self, now: str | None = None) -> dict:
    """Phase D (committed), then one alerts.send_digest per due digest."""
    result = _run("d", now)
    result["enqueued"] = _enqueue(self, DIGEST, "alerts.send_digest", now)
    return result


@shared_task(name="alerts.dispatch_deliveries", base=AlertsTask, bind=True)
def dispatch_deliveries(self, now: str | None = None) -> dict:
    """One alerts.send_delivery per due instant delivery."""
    return {"enqueued": _enqueue(self, INSTANT, "alerts.send_delivery", now)}


@shared_task(name="alerts.recover_stale", base=AlertsTask, bind=True)
def recover_stale(self, now: str | None = None) -> dict:
    """Put rows abandoned in ``sending`` past the lease back in the queue, and enqueue
    them right away instead of waiting for the next dispatch tick."""
    recovered = recover_stale_rows(worker.db(), parse_now(now), worker.get_settings())
    enqueued = {}
    if any(recovered.values()):
        enqueued = {"instant": _enqueue(self, INSTANT, "alerts.send_delivery", now),
                    "digests": _enqueue(self, DIGEST, "alerts.send_digest", now)}
    return {"recovered": recovered, "enqueued": enqueued}


@shared_task(name="alerts.ingest_event", base=AlertsTask)
def ingest_event(event: dict) -> dict:
    """Store one event (a repeated event_key is a no-op); intake validates it later."""
    from alerts.ingest import ingest_event as store

    return {"stored": store(worker.db(), event)}


def _enqueue(task: Task, kind: Kind, send_task_name: str, now: str | None) -> int:
    """Publish send tasks for due rows over one producer connection, after each chunk's
    marks are committed. An explicit ``now`` is handed on, so a test or a replay sees
    the same instant all the way through."""
    app = task.app
    send_task = app.tasks[send_task_name]  # of this task's app, whatever thread we are in
    extra = {"now": now} if now else {}
    with app.producer_or_acquire() as producer:
        reenqueue = _reenqueue_after(app, send_task_name)

        def publish(ids: list[int]) -> None:
            # kombu >= 5.7 pipelines a batch's publishes (a round trip per thousand
            # messages instead of one each); older kombu publishes them one by one.
            batch = producer.batch() if hasattr(producer, "batch") else contextlib.nullcontext()
            with batch:
                for row_id in ids:
                    send_task.apply_async((row_id,), extra, producer=producer)

        return dispatch.enqueue_due(worker.db(), kind, parse_now(now), reenqueue, publish)


def _reenqueue_after(app, send_task_name: str) -> timedelta:
    """How old a mark must be before its row is enqueued again. While the send queue
    still holds messages, a marked row's task may be among them — a backlog larger than
    the workers clear in ALERTS_REENQUEUE_AFTER_SECONDS must not be enqueued twice — so
    then only marks older than the visibility timeout count as lost."""
    after = app.conf.get("alerts_reenqueue_after_seconds") or DEFAULT_REENQUEUE_AFTER_SECONDS
    queue = app.amqp.router.route({}, send_task_name)["queue"].name
    with app.connection_for_read() as connection:  # its own: a failed check must not break publishing
        try:
            waiting = connection.default_channel.queue_declare(queue=queue, passive=True).message_count
        except connection.channel_errors:
            waiting = 0  # the queue does not exist (yet): nothing waits in it
    if waiting:
        after = max(after, app.conf.get("visibility_timeout") or 0)
    return timedelta(seconds=after)


# --- sends -------------------------------------------------------------------------------

@shared_task(name="alerts.send_digest", base=AlertsTask, bind=True)
def send_digest(self, digest_id: int, now: str | None = None, slot: str | None = None) -> str | None:
    return _send(self, DIGEST, digest_id, now, slot)


@shared_task(name="alerts.send_delivery", base=AlertsTask, bind=True)
def send_delivery(self, delivery_id: int, now: str | None = None, slot: str | None = None) -> str | None:
    return _send(self, INSTANT, delivery_id, now, slot)


def _send(task: Task, kind: Kind, row_id: int, now: str | None, slot: str | None = None) -> str | None:
    """Claim, send, record (``send_one``). Returns the outcome status; None when the row
    was not due or someone else had it; "rate_limited" when the task was put back.

    ``slot`` is set only by the task itself when it re-schedules: "chat" when it booked
    its chat's next free second, "both" when it booked its global slot as well and may
    send on waking without asking again (see alerts/ratelimit.py).
    """
    at = parse_now(now)
    db, channels = worker.db(), worker.channels()
    statements = worker.send_statements()
    limiter = worker.limiter(task.app) if channels.get("telegram") is not None else None
    if limiter is not None and slot != "both":  # without Telegram there is no limit to ask
        due, chat = dispatch.telegram_chat_if_due(db, kind, row_id, at, statements)
        if not due:
            return None
        if chat is not None:
            permit = limiter.acquire(chat, chat_held=slot == "chat", max_reserve=MAX_COUNTDOWN_SECONDS)
            if permit.wait > 0:
                # Before the claim: the row stays queued and nothing is counted as an attempt.
                held = "both" if permit.go else "chat" if permit.chat_held else None
                countdown = min(permit.wait, MAX_COUNTDOWN_SECONDS)
                dispatch.hold_mark(db, kind, row_id, at + timedelta(seconds=countdown), statements)
                task.apply_async(task.request.args, {**(task.request.kwargs or {}), "slot": held}, countdown=countdown)
                return "rate_limited"
    status = send_one(db, kind, row_id, at, worker.get_settings(), channels, autocommit=statements)
    if statements is not None and task.request.is_eager:
        # In a worker the outcome's commit overlaps Celery's ack and its fetch of the
        # next task (see send.py, _record_outcome); a caller running the task in its
        # own process reads the row next, so it gets it committed.
        statements.wait()
    return status
