"""Enqueue-once: which due rows get a Celery send task, marked in the database first.

A due row is marked ``enqueued_at = now`` in a committed transaction, and only then is
its task published (never inside the transaction: a worker could read the row before
the commit). A marked row is not enqueued again on the next beat tick while its task
waits in the queue — only when

- its mark is older than ``reenqueue_after`` (the task or its message was lost), or
- it became due again after the mark (a transient failure or a lease recovery set a
  later ``next_retry_at``).

A task delivered twice is harmless: only one claim (``outbox.claim``) wins its row.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.core.db import Database, is_postgres
from alerts.sending.outbox import Outbox

log = logging.getLogger(__name__)

# Rows marked and published per transaction: small enough that a crash between commit
# and publish strands few rows (until ``reenqueue_after``), large enough to be cheap.
ENQUEUE_CHUNK = 2000
# How many of one event's instant sends the event-driven path puts on the phase queue,
# ahead of any backlog in the send queue; the rest of a large fan-out goes the usual way.
FIRST_CHUNK = 100


def publish_due(app, db: Database, outbox: Outbox, task_name: str, now: datetime, settings: Settings,
                pass_on: str | None = None, where: Sequence[sa.ColumnElement] = (),
                first_chunk_queue: str | None = None) -> int:
    """Publish a ``task_name`` task for each row of ``outbox`` due at ``now`` that needs
    one (and matches ``where``), over one producer connection, each chunk after its
    marks are committed. ``pass_on`` is handed to the send tasks as their ``now``.
    ``first_chunk_queue``: the tasks of the first chunk (``FIRST_CHUNK`` rows) go to this
    queue instead of the task's own (the event-driven path, alerts/celery/instant_path.py)."""
    send_task = app.tasks[task_name]  # of this app, whatever thread we are in
    extra = {"now": pass_on} if pass_on else {}
    queues = iter([{"queue": first_chunk_queue}] if first_chunk_queue else [])
    with app.producer_or_acquire() as producer:
        def publish(ids: list[int]) -> None:
            route = next(queues, {})
            for row_id in ids:
                send_task.apply_async((row_id,), extra, producer=producer, **route)

        return enqueue_due(db, outbox, now, _reenqueue_after(app, task_name, settings), publish, where=where,
                           chunk=FIRST_CHUNK if first_chunk_queue else ENQUEUE_CHUNK)


def _reenqueue_after(app, task_name: str, settings: Settings) -> timedelta:
    """How old a mark must be before its row is enqueued again. While the send queue
    still holds messages, a marked row's task may be among them — a backlog larger than
    the workers clear in ALERTS_REENQUEUE_AFTER_SECONDS must not be enqueued twice — so
    then only marks older than the visibility timeout count as lost."""
    after = settings.reenqueue_after_seconds
    queue = app.amqp.router.route({}, task_name)["queue"].name
    with app.connection_for_read() as connection:  # its own: a failed check must not break publishing
        try:
            waiting = connection.default_channel.queue_declare(queue=queue, passive=True).message_count
        except connection.channel_errors:
            waiting = 0  # the queue does not exist (yet): nothing waits in it
    if waiting:
        after = max(after, settings.celery_visibility_timeout_seconds)
    return timedelta(seconds=after)


def enqueue_due(db: Database, outbox: Outbox, now: datetime, reenqueue_after: timedelta,
                publish: Callable[[list[int]], None], chunk: int = ENQUEUE_CHUNK,
                where: Sequence[sa.ColumnElement] = ()) -> int:
    """Mark due rows a chunk at a time, commit, then ``publish(ids)``. Returns the count."""
    total, after = 0, 0
    while True:
        with db.transaction() as conn:
            ids = mark_due(conn, outbox, now, reenqueue_after, chunk, after_id=after, where=where)
        if not ids:
            return total
        try:
            publish(ids)
        except BaseException:
            _unmark(db, outbox, ids, now)
            raise
        total += len(ids)
        after = ids[-1]


def mark_due(conn: Connection, outbox: Outbox, now: datetime, reenqueue_after: timedelta, limit: int,
             after_id: int = 0, where: Sequence[sa.ColumnElement] = ()) -> list[int]:
    """Set ``enqueued_at = now`` on up to ``limit`` due rows (ids above ``after_id``, and
    matching ``where``) that need a task; return their ids in order."""
    t = outbox.table
    needs_task = sa.or_(t.c.enqueued_at.is_(None), t.c.enqueued_at <= now - reenqueue_after,
                        t.c.enqueued_at < t.c.next_retry_at)
    pick = (sa.select(t.c.id)
            .where(t.c.status == m.QUEUED, t.c.id > after_id, *outbox.due(now), needs_task, *where)
            .order_by(t.c.id).limit(limit))
    if is_postgres(conn):
        pick = pick.with_for_update(skip_locked=True)  # rows being claimed right now: next time
    stmt = sa.update(t).where(t.c.id.in_(pick.scalar_subquery())).values(enqueued_at=now).returning(t.c.id)
    return sorted(conn.execute(stmt).scalars())


def _unmark(db: Database, outbox: Outbox, ids: list[int], now: datetime) -> None:
    """Publishing failed (broker down): let the next tick pick these rows up again.
    Best effort: if this fails too, the rows come back after ``reenqueue_after``."""
    t = outbox.table
    try:
        with db.transaction() as conn:
            conn.execute(sa.update(t).where(t.c.id.in_(ids), t.c.enqueued_at == now).values(enqueued_at=None))
    except sa.exc.SQLAlchemyError as exc:
        log.warning("could not clear enqueue marks after a failed publish: %s", exc)
