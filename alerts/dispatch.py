"""Enqueue-once: which due rows get a send task, marked in the database first.

A due row is marked ``enqueued_at = now`` in a committed transaction, and only then is
its task published (never inside the transaction: a worker could read the row before
the commit). A marked row is not enqueued again on the next beat tick while its task
waits in the queue — only when

- its mark is older than ``reenqueue_after`` (the task or its message was lost), or
- it became due again after the mark (a transient failure or a lease recovery set a
  later ``next_retry_at``).

A task delivered twice is harmless: the claim in ``send_one`` lets one of them send.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts import models as m
from alerts.db import Database, is_postgres
from alerts.phases.send import Autocommit, Kind

log = logging.getLogger(__name__)

# Rows marked and published per transaction: small enough that a crash between commit
# and publish strands few rows (until ``reenqueue_after``), large enough to be cheap.
ENQUEUE_CHUNK = 2000


def enqueue_due(db: Database, kind: Kind, now: datetime, reenqueue_after: timedelta,
                publish: Callable[[list[int]], None], chunk: int = ENQUEUE_CHUNK) -> int:
    """Mark due rows a chunk at a time, commit, then ``publish(ids)``. Returns the count."""
    total, after = 0, 0
    while True:
        with db.transaction() as conn:
            ids = mark_due(conn, kind, now, reenqueue_after, chunk, after_id=after)
        if not ids:
            return total
        try:
            publish(ids)
        except BaseException:
            _unmark(db, kind, ids, now)
            raise
        total += len(ids)
        after = ids[-1]


def mark_due(conn: Connection, kind: Kind, now: datetime, reenqueue_after: timedelta, limit: int,
             after_id: int = 0) -> list[int]:
    """Set ``enqueued_at = now`` on up to ``limit`` due rows (ids above ``after_id``)
    that need a task; return their ids in order."""
    table = kind.table()
    needs_task = sa.or_(
        table.c.enqueued_at.is_(None),
        table.c.enqueued_at <= now - reenqueue_after,
        table.c.enqueued_at < table.c.next_retry_at,
    )
    pick = (sa.select(table.c.id)
            .where(table.c.status == "queued", table.c.id > after_id, *kind.due(table, now), needs_task)
            .order_by(table.c.id).limit(limit))
    if is_postgres(conn):
        pick = pick.with_for_update(skip_locked=True)  # rows being claimed right now: next time
    stmt = (sa.update(table).where(table.c.id.in_(pick.scalar_subquery()))
            .values(enqueued_at=now).returning(table.c.id))
    return sorted(conn.execute(stmt).scalars())


def _unmark(db: Database, kind: Kind, ids: list[int], now: datetime) -> None:
    """Publishing failed (broker down): let the next tick pick these rows up again.
    Best effort: if this fails too, the rows come back after ``reenqueue_after``."""
    table = kind.table()
    try:
        with db.transaction() as conn:
            conn.execute(sa.update(table).where(table.c.id.in_(ids), table.c.enqueued_at == now)
                         .values(enqueued_at=None))
    except sa.exc.SQLAlchemyError as exc:
        log.warning("could not clear enqueue marks after a failed publish: %s", exc)


def hold_mark(db: Database, kind: Kind, row_id: int, until: datetime, autocommit: Autocommit | None = None) -> None:
    """A task that re-schedules itself (a rate-limit wait) moves its row's mark to when it
    will run: until ``reenqueue_after`` past that, the row's task is not taken for lost
    and no second task is published for it — each of which would book a slot of its own
    and waste it. ``autocommit``: the worker's shared connection."""
    table = kind.table()
    stmt = sa.update(table).where(table.c.id == row_id, table.c.status == "queued").values(enqueued_at=until)
    if autocommit is not None:
        autocommit(lambda conn: conn.execute(stmt))
    else:
        with db.transaction() as conn:
            conn.execute(stmt)


def telegram_chat_if_due(db: Database, kind: Kind, row_id: int, now: datetime,
                         autocommit: Autocommit | None = None) -> tuple[bool, str | None]:
    """(is the row due, the Telegram chat it would go to — None for other channels or
    rows that will be skipped). Read before claiming, so a rate-limited task can wait
    with its row still queued. ``autocommit``: the worker's shared connection."""
    table, u = kind.table(), m.users
    query = (sa.select(table.c.channel, u.c.telegram_chat_id, u.c.is_active)
             .select_from(table.join(u, u.c.id == table.c.user_id))
             .where(table.c.id == row_id, table.c.status == "queued", *kind.due(table, now)))
    if db.dry_run:
        with db.transaction() as dry:
            row = dry.execute(query).first()
    elif autocommit is not None:
        row = autocommit(lambda conn: conn.execute(query).first())
    else:  # one statement, no BEGIN/COMMIT round trips: this runs before every send
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as own:
            row = own.execute(query).first()
    if row is None:
        return False, None
    chat = (row.telegram_chat_id or "").strip()
    return True, (chat if row.channel == "telegram" and row.is_active and chat else None)
