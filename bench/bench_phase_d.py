"""Benchmark Phase D (digest build) on PostgreSQL against a hand-written reference SQL.

    python bench/bench_phase_d.py --users 10000 100000 --events 10 --rounds 3
    python bench/bench_phase_d.py --send-times --users 100000 --events 10   # 1M, send times

For each size and round it bulk-loads users × events pending digest deliveries on one
channel (generate_series, no Python loops), times ``run_phase_d`` in a child process (so
the peak RSS is Phase D's own), reloads the same data and times the reference: the plain
set-based SQL one would write by hand for this data, computing windows with PostgreSQL's
own ``AT TIME ZONE``. Both must leave the same digests, items and batched deliveries; the
script checks that. The table shows the best round of each (the machine may be shared).

``--send-times`` (docs/policy.md, send time) spreads the users over 5 zones and 10 send times (9 of
their own and ALERTS_DIGEST_SEND_TIME for the rest), and the reference then shifts each
event's local time by the send time before truncating to the day. That reference is
exact only away from DST changes, which the data (12-13 May) stays clear of.

Without ``--database-url`` it creates a throwaway database on 127.0.0.1 and drops it at
the end. With one, that database is migrated and its alert tables are EMPTIED.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from alerts.core.settings import Settings  # noqa: E402
from alerts.core.db import make_engine  # noqa: E402
from bench._common import database, write_results  # noqa: E402

NOW = datetime(2026, 5, 13, 12, 0, tzinfo=timezone.utc)
ENV = {"ALERTS_HOURLY_DIGEST_PLANS": "pro"}
TARGET_RATIO, TARGET_RSS_MB, TARGET_SCALING = 1.3, 200, 11.0

TABLES = "user_alert_digest_items, user_alert_digests, user_alert_deliveries, alert_events, users"

# A quarter of the users each in the default zone (NULL), Amsterdam, New York and a
# +05:30 zone; every tenth user is on the 'pro' plan with hourly digests. Events are
# spread over one day, 2 h 13 min apart.
LOAD_SQL = [
    f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE",
    """INSERT INTO users (id, email, plan, timezone, digest_period)
       SELECT i, 'user' || i || '@example.com',
              CASE WHEN i %% 10 = 0 THEN 'pro' ELSE 'free' END,
              (ARRAY[NULL, 'Europe/Amsterdam', 'America/New_York', 'Asia/Kolkata'])[i %% 4 + 1],
              CASE WHEN i %% 10 = 0 THEN 'hourly' END
       FROM generate_series(1, %(users)s) AS i""",
    """INSERT INTO alert_events (id, event_key, alert_type, region, severity, title, status, created_at)
       SELECT j, 'bench-' || j, 'price_spike', 'NL', 1 + j %% 5, 'Event ' || j, 'fanned_out',
              timestamptz '2026-05-12 00:05:00+00' + (j - 1) * interval '2 hours 13 minutes'
       FROM generate_series(1, %(events)s) AS j""",
    """INSERT INTO user_alert_deliveries (user_id, alert_event_id, channel, delivery_kind, status, created_at)
       SELECT i, j, 'email', 'digest', 'queued', timestamptz '2026-05-12 23:00:00+00'
       FROM generate_series(1, %(users)s) AS i CROSS JOIN generate_series(1, %(events)s) AS j""",
    "SELECT setval(pg_get_serial_sequence('users', 'id'), %(users)s)",
    "SELECT setval(pg_get_serial_sequence('alert_events', 'id'), %(events)s)",
]

# The reference: what one would write by hand for a fresh database (no open digests to
# lock, no follow-ups): two statements and an ANALYZE.
REFERENCE_PLACED = """
    WITH p AS (
        SELECT d.id, d.user_id, d.channel, e.created_at,
               CASE WHEN u.digest_period = 'hourly' AND u.plan = ANY(%(plans)s) THEN 'hourly'
                    ELSE %(period)s END AS period,
               COALESCE(u.timezone, %(tz)s) AS tz
        FROM user_alert_deliveries d
        JOIN users u ON u.id = d.user_id
        JOIN alert_events e ON e.id = d.alert_event_id
        WHERE d.delivery_kind = 'digest' AND d.status = 'queued' AND d.channel IN ('email', 'telegram')
    ), placed AS (
        SELECT id, user_id, channel, period,
               CASE WHEN period = 'daily' THEN date_trunc('day', created_at AT TIME ZONE tz) AT TIME ZONE tz
                    ELSE created_at - ((created_at AT TIME ZONE tz) - date_trunc('hour', created_at AT TIME ZONE tz))
               END AS ws,
               CASE WHEN period = 'daily'
                    THEN (date_trunc('day', created_at AT TIME ZONE tz) + interval '1 day') AT TIME ZONE tz
                    ELSE created_at - ((created_at AT TIME ZONE tz) - date_trunc('hour', created_at AT TIME ZONE tz))
                         + interval '1 hour'
               END AS we
        FROM p
    )
"""
REFERENCE_SQL = [
    REFERENCE_PLACED + """
    INSERT INTO user_alert_digests (user_id, channel, period, window_start, window_end, sequence, digest_key,
                                    status, attempts, next_retry_at, created_at)
    SELECT DISTINCT user_id, channel, period, ws, we, 0,
           user_id || ':' || channel || ':' || period || ':'
             || to_char(ws AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
           'queued', 0, we, %(now)s
    FROM placed
    ON CONFLICT (digest_key) DO NOTHING""",
    "ANALYZE user_alert_digests",  # or the next join is planned for an empty table
    REFERENCE_PLACED + """
    , attached AS (
        INSERT INTO user_alert_digest_items (digest_id, delivery_id)
        SELECT g.id, placed.id FROM placed
        JOIN user_alert_digests g ON g.user_id = placed.user_id AND g.channel = placed.channel
             AND g.period = placed.period AND g.window_start = placed.ws AND g.status = 'queued'
        RETURNING delivery_id
    )
    UPDATE user_alert_deliveries d SET status = 'skipped', last_error = 'batched_into_digest'
    FROM attached WHERE d.id = attached.delivery_id""",
]

# What both runs must leave behind, compared after each.
OUTCOME_SQL = """
    SELECT (SELECT count(*) FROM user_alert_digests),
           (SELECT count(*) FROM user_alert_digest_items),
           (SELECT count(*) FROM user_alert_deliveries WHERE last_error = 'batched_into_digest'),
           (SELECT md5(string_agg(digest_key || '|' || window_end::text, ',' ORDER BY digest_key))
              FROM user_alert_digests)
"""


# --send-times: 5 zones and 10 send times (NULL: ALERTS_DIGEST_SEND_TIME, 00:00), every
# combination about equally often.
SEND_TIME_USERS_SQL = """
    UPDATE users SET
        timezone = (ARRAY['Europe/Amsterdam', 'America/New_York', 'Asia/Kolkata', 'Australia/Sydney',
                          'America/Sao_Paulo'])[id %% 5 + 1],
        digest_send_time = (ARRAY[NULL, '06:00', '07:30', '08:00', '09:15', '12:00', '17:45', '18:00',
                                  '21:30', '23:00'])[(id / 5) %% 10 + 1]"""

# The window of a daily user with send time T: the local day of (local time - T), from T.
SEND_TIME_PLACED = """
    WITH p AS (
        SELECT d.id, d.user_id, d.channel, e.created_at,
               CASE WHEN u.digest_period = 'hourly' AND u.plan = ANY(%(plans)s) THEN 'hourly'
                    ELSE %(period)s END AS period,
               COALESCE(u.timezone, %(tz)s) AS tz,
               CAST(COALESCE(u.digest_send_time, %(send_time)s) AS interval) AS st
        FROM user_alert_deliveries d
        JOIN users u ON u.id = d.user_id
        JOIN alert_events e ON e.id = d.alert_event_id
        WHERE d.delivery_kind = 'digest' AND d.status = 'queued' AND d.channel IN ('email', 'telegram')
    ), placed AS (
        SELECT id, user_id, channel, period,
               CASE WHEN period = 'daily'
                    THEN (date_trunc('day', (created_at AT TIME ZONE tz) - st) + st) AT TIME ZONE tz
                    ELSE created_at - ((created_at AT TIME ZONE tz) - date_trunc('hour', created_at AT TIME ZONE tz))
               END AS ws,
               CASE WHEN period = 'daily'
                    THEN (date_trunc('day', (created_at AT TIME ZONE tz) - st) + interval '1 day' + st) AT TIME ZONE tz
                    ELSE created_at - ((created_at AT TIME ZONE tz) - date_trunc('hour', created_at AT TIME ZONE tz))
                         + interval '1 hour'
               END AS we
        FROM p
    )
"""


def main() -> None:
    args = _parse()
    if args.child:
        return _child(args.database_url)
    with database(args.database_url) as url:
        engine = make_engine(url, isolation_level="AUTOCOMMIT")
        results = [_measure(engine, url, users, args.events, args.rounds, args.send_times) for users in args.users]
        engine.dispose()
    target = _report(results)
    options = {key: getattr(args, key) for key in ("users", "events", "rounds", "send_times")}
    write_results("phase_d", {"options": options, "sizes": results, "target": target})


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000],
                   help="users per run; several values run several sizes (default: 10000 100000)")
    p.add_argument("--events", type=int, default=10, help="digest events per user (default: 10)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each side per size; the best counts (default: 1)")
    p.add_argument("--database-url", help="PostgreSQL URL to use (its alert tables are emptied); "
                                          "default: a throwaway database on 127.0.0.1")
    p.add_argument("--send-times", action="store_true",
                   help="users in 5 zones with 10 digest send times, and the matching reference")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def _load(engine, users: int, events: int, send_times: bool) -> None:
    with engine.connect() as conn:
        for sql in LOAD_SQL + ([SEND_TIME_USERS_SQL] if send_times else []):
            conn.exec_driver_sql(sql, {"users": users, "events": events})
        conn.exec_driver_sql("VACUUM ANALYZE")
        conn.exec_driver_sql("CHECKPOINT")


def _measure(engine, url: str, users: int, events: int, rounds: int, send_times: bool) -> dict:
    times = {"phase D": [], "reference": []}
    outcomes, rss = {}, []
    for n in range(rounds):
        # Alternate which side goes first, so a drift in machine load hits both alike.
        for side in (("phase D", "reference") if n % 2 == 0 else ("reference", "phase D")):
            print(f"[bench] {users} users x {events} events, round {n + 1}: {side}", file=sys.stderr)
            _load(engine, users, events, send_times)
            if side == "phase D":
                child = subprocess.run([sys.executable, __file__, "--child", "--database-url", url],
                                       check=True, capture_output=True, text=True)
                run = json.loads(child.stdout)
                times[side].append(run["seconds"])
                rss.append((run["max_rss_mb"], run["base_rss_mb"]))
            else:
                times[side].append(_run_reference(engine, send_times))
            outcomes[side] = _outcome(engine)
        if outcomes["phase D"] != outcomes["reference"]:
            raise SystemExit(f"phase D and the reference disagree: {outcomes}")
    return {"deliveries": users * events, "digests": outcomes["phase D"][0], "phase_d_s": min(times["phase D"]),
            "reference_s": min(times["reference"]), "rss_mb": max(r for r, _ in rss),
            "base_rss_mb": max(b for _, b in rss)}


def _run_reference(engine, send_times: bool) -> float:
    settings = Settings.from_env(ENV)
    params = {"plans": sorted(settings.hourly_digest_plans), "period": settings.digest_period,
              "tz": settings.timezone, "send_time": settings.digest_send_time, "now": NOW}
    statements = REFERENCE_SQL
    if send_times:
        statements = [sql.replace(REFERENCE_PLACED, SEND_TIME_PLACED) for sql in REFERENCE_SQL]
    with engine.connect() as conn:
        started = time.perf_counter()
        with conn.begin():
            for sql in statements:
                conn.exec_driver_sql(sql, params)
        return time.perf_counter() - started


def _outcome(engine) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.exec_driver_sql(OUTCOME_SQL).one())


def _child(url: str) -> None:
    """Runs in its own process: Phase D once, then its time and peak RSS as JSON."""
    import resource

    from alerts.core.db import Database
    from alerts.channels.registry import ChannelSet
    from alerts.core.clock import Clock
    from alerts.phases.digests import run_phase_d

    settings = Settings.from_env({**ENV, "DATABASE_URL": url})
    engine = make_engine(url)
    base_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # interpreter and imports
    started = time.perf_counter()
    counts = run_phase_d(Database(engine), Clock(NOW), settings, ChannelSet())
    seconds = time.perf_counter() - started
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "max_rss_mb": max_rss_mb, "base_rss_mb": base_rss_mb, "counts": counts}))


def _report(results: list[dict]) -> str:
    """Print the table (and add each size's ratio to it); the verdict."""
    print(f"{'deliveries':>10} {'digests':>8} {'phase D s':>10} {'reference s':>12} {'ratio':>6} "
          f"{'peak RSS MB':>12} {'(imports MB)':>12}")
    for r in results:
        r["ratio"] = r["phase_d_s"] / r["reference_s"]
        print(f"{r['deliveries']:>10} {r['digests']:>8} {r['phase_d_s']:>10.2f} {r['reference_s']:>12.2f} "
              f"{r['ratio']:>6.2f} {r['rss_mb']:>12.1f} {r['base_rss_mb']:>12.1f}")
    ok = all(r["ratio"] <= TARGET_RATIO and r["rss_mb"] <= TARGET_RSS_MB for r in results)
    for small, big in zip(results, results[1:]):
        rows, cost = big["deliveries"] / small["deliveries"], big["phase_d_s"] / small["phase_d_s"]
        print(f"scaling {small['deliveries']} -> {big['deliveries']}: {rows:.0f}x rows, {cost:.2f}x time")
        ok = ok and cost <= TARGET_SCALING / 10 * rows
    verdict = (f"ratio <= {TARGET_RATIO}, RSS <= {TARGET_RSS_MB} MB, 10x rows <= {TARGET_SCALING:.0f}x time: "
               f"{'met' if ok else 'NOT met'}")
    print(f"targets ({verdict.replace(': ', '): ', 1)}")
    return verdict


if __name__ == "__main__":
    main()
