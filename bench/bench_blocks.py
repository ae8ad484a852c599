"""What destination health (docs/policy.md, "Blocked destinations") costs Phase C: the
block join in the load, and recording a block.

    python bench/bench_blocks.py [--users 20000] [--blocked 0.05] [--rounds 5]

On a throwaway PostgreSQL database: ``--users`` users with one queued instant email
delivery each, ``--blocked`` of them with a block on their current address. Measured,
best of ``--rounds``:

1. the load statement Phase C runs for each claimed batch (``ALERTS_SEND_BATCH_SIZE``,
   200), over every row, as it is (with the LEFT JOIN on ``user_channel_blocks``) and
   as it was before (the same statement without the join): milliseconds per batch;
2. recording a block as the send path does for a destination found gone, for a user
   with ``--queued`` queued rows on the channel (``blocks.record``'s upsert and
   ``outbox.skip_queued``), in a rolled-back transaction: milliseconds per block.

Prints JSON; it also checks that the load skips exactly the blocked users' rows.
Results: bench/results/blocks-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from alerts.core import tables as m  # noqa: E402
from alerts.core.db import make_engine  # noqa: E402
from alerts.sending import blocks, outbox  # noqa: E402
from alerts.sending.outbox import EVENT_KEYS, INSTANT, _user_columns  # noqa: E402
from bench._common import create_database, drop_database, write_results  # noqa: E402

BATCH = 200
NOW = datetime(2026, 5, 12, 12, 0, tzinfo=timezone.utc)
REASON = "smtp 550 5.1.1 user unknown"


def seed(conn, users: int, blocked: float, queued: int) -> None:
    conn.execute(sa.text("INSERT INTO users (email) SELECT 'u' || n || '@bench.test' FROM generate_series(1, :n) n"),
                 {"n": users})
    conn.execute(sa.text("INSERT INTO alert_events (event_key, alert_type, severity, title, status) "
                         "SELECT 'e' || n, 'outage', 3, 'Event ' || n, 'fanned_out' FROM generate_series(1, :q) n"),
                 {"q": queued})
    conn.execute(sa.text("INSERT INTO user_alert_deliveries (user_id, alert_event_id, channel, delivery_kind) "
                         "SELECT u.id, 1, 'email', 'instant' FROM users u"))
    conn.execute(sa.text("INSERT INTO user_channel_blocks (user_id, channel, address, reason) "
                         "SELECT id, 'email', email, 'smtp 550 5.1.1 user unknown' FROM users "
                         "WHERE id % :every = 0"), {"every": max(1, round(1 / blocked)) if blocked else users + 1})
    conn.execute(sa.text("ANALYZE"))


def before_load() -> sa.Select:
    """The load statement as it was before destination health: no join on the blocks."""
    d, u, e = m.user_alert_deliveries, m.users, m.alert_events
    return (sa.select(d.c.id.label("delivery_id"), d.c.channel, d.c.user_id, *_user_columns(),
                      *(e.c[key] for key in EVENT_KEYS))
            .select_from(d.join(u, u.c.id == d.c.user_id).join(e, e.c.id == d.c.alert_event_id))
            .where(d.c.id.in_(sa.bindparam("ids", expanding=True))).order_by(d.c.id))


def time_loads(conn, statement, ids: list[int], rounds: int) -> tuple[float, list]:
    best, rows = float("inf"), []
    for _ in range(rounds):
        started = time.perf_counter()
        rows = []
        for first in range(0, len(ids), BATCH):
            rows += conn.execute(statement, {"ids": ids[first:first + BATCH]}).mappings().all()
        best = min(best, time.perf_counter() - started)
    return best / (len(ids) / BATCH) * 1000, rows


def time_record(engine, users: int, queued: int, rounds: int) -> float:
    with engine.begin() as conn:  # one user with `queued` queued rows on email
        conn.execute(sa.text("INSERT INTO user_alert_deliveries (user_id, alert_event_id, channel, delivery_kind) "
                             "SELECT 1, n, 'email', 'instant' FROM generate_series(2, :q) n"), {"q": queued})
    best = float("inf")
    for _ in range(rounds):
        with engine.connect() as conn:
            trans = conn.begin()
            started = time.perf_counter()
            # What the send path does for a destination found gone: the block, and the
            # user's other queued rows on the channel skipped (alerts/sending/service.py).
            blocks.record(conn, 1, "email", "u1@bench.test", REASON, NOW)
            skipped = sum(outbox.skip_queued(conn, 1, "email", m.destination_disabled(REASON),
                                             blocks.address_unchanged(1, "email", "u1@bench.test"),
                                             digest_deliveries=False).values())
            best = min(best, time.perf_counter() - started)
            trans.rollback()
            assert skipped == queued, skipped
    return best * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--blocked", type=float, default=0.05, help="share of users with a block in force")
    parser.add_argument("--queued", type=int, default=50, help="queued rows of the user a block is recorded for")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    url = create_database("alerts_bench_blocks")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            seed(conn, args.users, args.blocked, args.queued)
            ids = conn.execute(sa.select(m.user_alert_deliveries.c.id).order_by(m.user_alert_deliveries.c.id)
                               ).scalars().all()
            n_blocks = conn.execute(sa.select(sa.func.count()).select_from(m.user_channel_blocks)).scalar()
        with engine.connect() as conn:
            with_join, rows = time_loads(conn, INSTANT._load(), ids, args.rounds)
            without, _ = time_loads(conn, before_load(), ids, args.rounds)
        skipped = sum(1 for r in rows if r["block_reason"] is not None)
        assert skipped == n_blocks, (skipped, n_blocks)
        record_ms = time_record(engine, args.users, args.queued, args.rounds)
        payload = {"users": args.users, "blocks": n_blocks, "batch": BATCH,
                   "load_ms_per_batch": {"with_block_join": round(with_join, 3),
                                         "without (before destination health)": round(without, 3)},
                   "join_overhead": round(with_join / without - 1, 3),
                   "record_block_ms": {"queued_rows_skipped": args.queued, "ms": round(record_ms, 3)}}
        print(json.dumps(payload, indent=2))
        write_results("blocks", payload)
        return 0
    finally:
        engine.dispose()
        drop_database(url)


if __name__ == "__main__":
    sys.exit(main())
