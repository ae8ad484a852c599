"""What one-click unsubscribe costs (docs/policy.md, "Unsubscribed"), on a throwaway PostgreSQL database.

1. **The sender's check.** ``outbox.load`` skips rows of users whose preferences on the
   channel are all disabled (a correlated EXISTS pair per row). Times the load of a
   200-row claim with that check and with it replaced by ``false``, alternating, on
   ``--users`` users with 3 email preferences each and ``--rows`` queued instant
   deliveries; every claim is rolled back so each round loads the same kind of rows.
2. **The POST.** One-click POSTs through the Flask app (test client, no HTTP server),
   each for a user with ``--queued`` queued deliveries and a queued digest: latency of
   the whole request — token check, the one transaction, the in-flight check — p50/p95.

    python3 bench/bench_unsubscribe.py [--users 5000] [--rows 50000] [--rounds 30] [--posts 300]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench._common import database, write_results  # noqa: E402

KEY = "bench-secret-key-of-at-least-32-characters"
NOW = datetime(2026, 5, 13, tzinfo=timezone.utc)
BATCH = 200


def seed(engine, users: int, rows: int, queued_per_user: int = 0) -> list[int]:
    from alerts.core import tables as m

    with engine.begin() as conn:
        ids = conn.execute(sa.insert(m.users).returning(m.users.c.id),
                           [{"email": f"u{n}@example.com"} for n in range(users)]).scalars().all()
        conn.execute(sa.insert(m.user_alert_prefs), [
            {"user_id": u, "alert_type": t, "region": "*", "channel": "email", "delivery_kind": "instant"}
            for u in ids for t in ("*", "price_spike", "pipeline_outage")])
        per_user = max(1, rows // users) if rows else queued_per_user
        events = conn.execute(sa.insert(m.alert_events).returning(m.alert_events.c.id), [
            {"event_key": f"bench-{users}-{n}", "alert_type": "price_spike", "severity": 3, "title": f"Bench {n}",
             "status": "fanned_out"} for n in range(per_user)]).scalars().all()
        conn.execute(sa.insert(m.user_alert_deliveries), [
            {"user_id": u, "alert_event_id": e, "channel": "email", "delivery_kind": "instant", "status": "queued"}
            for u in ids for e in events])
        conn.exec_driver_sql("ANALYZE")
    return ids


def time_loads(engine, rounds: int) -> dict:
    from alerts.sending import outbox
    from alerts.channels.registry import ChannelSet
    from alerts.core.settings import Settings

    settings = Settings.from_env({"DATABASE_URL": str(engine.url)})
    channels = ChannelSet()  # no channel: the load's query and rows only, no rendering
    real = outbox._unsubscribed

    def variant(check: bool):
        outbox._unsubscribed = real if check else (lambda t: sa.false().label("unsubscribed"))
        type(outbox.INSTANT)._load.cache_clear()

    times = {True: [], False: []}
    try:
        for n in range(rounds * 2):
            check = n % 2 == 0
            variant(check)
            with engine.connect() as conn:
                tx = conn.begin()
                claimed = outbox.INSTANT.claim(conn, NOW, BATCH)
                start = time.perf_counter()
                jobs = outbox.INSTANT.load(conn, claimed, settings, channels)
                times[check].append(time.perf_counter() - start)
                assert len(jobs) == BATCH
                tx.rollback()
    finally:
        variant(True)
    with_check, without = statistics.median(times[True]), statistics.median(times[False])
    return {"load_200_ms_with_check": round(with_check * 1000, 2), "load_200_ms_without": round(without * 1000, 2),
            "ratio": round(with_check / without, 3)}


def time_posts(url: str, posts: int, queued: int) -> dict:
    from alerts.core import tokens
    from alerts.core.settings import Settings
    from alerts.core.db import make_engine
    from alerts.web import create_app

    engine = make_engine(url)
    with engine.begin() as conn:
        for table in ("user_alert_deliveries", "user_alert_prefs", "alert_events", "users"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
    users = seed(engine, posts, 0, queued_per_user=queued)
    client = create_app(Settings.from_env({"DATABASE_URL": url, "ALERTS_SECRET_KEY": KEY}), engine=engine).test_client()
    latencies = []
    for user in users:
        token = tokens.make_token(KEY, user, "email")
        start = time.perf_counter()
        response = client.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"})
        latencies.append(time.perf_counter() - start)
        assert response.status_code == 200
    with engine.connect() as conn:
        skipped = conn.exec_driver_sql("SELECT count(*) FROM user_alert_deliveries WHERE last_error = 'unsubscribed'"
                                       ).scalar_one()
    engine.dispose()
    latencies.sort()
    return {"posts": posts, "queued_per_user": queued, "rows_skipped": skipped,
            "post_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "post_p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1000, 2)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--queued", type=int, default=5)
    args = parser.parse_args()
    from alerts.core.db import make_engine

    with database(prefix="alerts_bench_unsub") as url:
        engine = make_engine(url)
        seed(engine, args.users, args.rows)
        result = {"users": args.users, "rows": args.rows, **time_loads(engine, args.rounds)}
        engine.dispose()
        result.update(time_posts(url, args.posts, args.queued))
    print(json.dumps(result))
    write_results("unsubscribe", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
