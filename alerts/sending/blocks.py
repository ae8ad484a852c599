"""Destination health (docs/policy.md): ``user_channel_blocks``, one row per (user, channel)
whose destination a provider said is gone.

    record(conn, …)        a gone answer: upsert the block — in the transaction of the failed
                           row's outcome, which also skips the user's other queued rows on
                           the channel while ``address_unchanged``
    in_force(table)        the join condition Phase C's load uses: a block holds while its
                           address is the user's current address for the channel
    listed / lift / lift_for_rows / counts   for ``alerts destinations``, ``retry``, ``status``

A block is never removed by the send path: when the user's address changes, the block
stops matching (the new address is tried) and stays as the record of what failed. A
later gone answer for the new address overwrites it (unique (user_id, channel)).
"""
from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.core.db import is_postgres

b = m.user_channel_blocks


def current_address(channel: sa.ColumnElement) -> sa.ColumnElement:
    """The user's address for ``channel`` (a column or a literal), as a send uses it (trimmed).
    Needs ``users`` in the FROM clause."""
    u = m.users
    return sa.func.trim(sa.case(*((channel == name, u.c[column]) for name, column in m.RECIPIENT_COLUMNS.items())))


def in_force(table: sa.Table) -> sa.ColumnElement:
    """ON clause joining ``table``'s rows (with ``users``) to the block that stops them."""
    return sa.and_(b.c.user_id == table.c.user_id, b.c.channel == table.c.channel,
                   b.c.address == current_address(table.c.channel))


def record(conn: Connection, user_id: int, channel: str, address: str, reason: str, now: datetime) -> None:
    """Block (user, channel) at ``address`` for ``reason``. The caller skips the user's
    other queued rows on the channel in the same transaction (``outbox.skip_queued`` with
    ``address_unchanged``)."""
    insert = (postgresql.insert if is_postgres(conn) else sqlite.insert)(b)
    values = {"user_id": user_id, "channel": channel, "address": address, "reason": reason, "created_at": now}
    conn.execute(insert.values(**values).on_conflict_do_update(
        index_elements=[b.c.user_id, b.c.channel],
        # The same address failing again (another sender's message in flight) keeps its "since".
        set_={"address": address, "reason": reason,
              "created_at": sa.case((b.c.address == address, b.c.created_at), else_=insert.excluded.created_at)}))


def address_unchanged(user_id: int, channel: str, address: str) -> sa.ColumnElement:
    """True while ``address`` is still the user's current address for ``channel``."""
    return (sa.select(m.users.c.id)
            .where(m.users.c.id == user_id, current_address(sa.literal(channel)) == address).exists())


def listed(conn: Connection) -> list[dict]:
    """Every block, oldest first, with whether it still holds (the address is unchanged)."""
    u = m.users
    holds = b.c.address == current_address(b.c.channel)
    rows = conn.execute(sa.select(b.c.user_id, b.c.channel, b.c.address, b.c.reason, b.c.created_at.label("since"),
                                  sa.case((holds, sa.true()), else_=sa.false()).label("in_force"))
                        .select_from(b.join(u, u.c.id == b.c.user_id))
                        .order_by(b.c.created_at, b.c.user_id, b.c.channel)).mappings()
    return [{**row, "in_force": bool(row["in_force"])} for row in rows]


def lift(conn: Connection, user_id: int, channel: str) -> bool:
    """Remove one block; False when there was none."""
    return conn.execute(sa.delete(b).where(b.c.user_id == user_id, b.c.channel == channel)).rowcount == 1


def lift_for_rows(conn: Connection, table: sa.Table, where: list[sa.ColumnElement]) -> int:
    """Remove the blocks of the destinations of ``table``'s rows matching ``where``."""
    rows = sa.select(table.c.user_id, table.c.channel).where(*where)
    return conn.execute(sa.delete(b).where(sa.tuple_(b.c.user_id, b.c.channel).in_(rows))).rowcount


def counts(conn: Connection) -> dict[str, dict[str, int]]:
    """Blocks in force, by channel and reason."""
    u = m.users
    rows = conn.execute(sa.select(b.c.channel, b.c.reason, sa.func.count())
                        .select_from(b.join(u, u.c.id == b.c.user_id))
                        .where(b.c.address == current_address(b.c.channel))
                        .group_by(b.c.channel, b.c.reason).order_by(b.c.channel, b.c.reason)).all()
    out: dict[str, dict[str, int]] = {}
    for channel, reason, n in rows:
        out.setdefault(channel, {})[reason] = n
    return out
