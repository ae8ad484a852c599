"""Benchmark `alerts explain` and the `/metrics` scrape on a database of a million
deliveries (PostgreSQL).

    python bench/bench_explain.py                       # 1,000,000 deliveries
    python bench/bench_explain.py --deliveries 50000    # a quick run

Loads the fixture with set-based SQL (generate_series, no Python loop per row): users
with preferences on every channel, 1,000 events over ten days (a few rejected, new or
ready; some telling one story), and ``--deliveries`` deliveries, 50 per user, in every
state the pipeline leaves them — sent, batched into daily digests (with their digests
and items), failed, superseded, unsubscribed, blocked, without an address, held by
quiet hours, waiting for a retry, in a send — plus the blocks of 1 % of the users. Then
VACUUM ANALYZE, as autovacuum leaves a table in steady state, and:

1. ``explain()`` for ``--samples`` (user, event) pairs, half of them with a delivery,
   half drawn at random (mostly without one), each on a connection from the pool as the
   command has it: median, 95th percentile and worst, with rendering and JSON included;
   the statements one explain runs, each checked with EXPLAIN for a sequential scan of
   a large table;
2. ``alerts explain`` as an operator runs it (a new process: imports, settings, connect),
   ``--cli-runs`` times;
3. ``GET /metrics`` through the Flask app, ``--scrapes`` times, and each family's query on
   its own, with its plan's scan of the deliveries table.

Results are printed and written to bench/results/explain-<YYYY-MM-DD>.json.
Without ``--database-url`` it creates a throwaway database on 127.0.0.1 and drops it at
the end. With one, that database is migrated and its alert tables are EMPTIED.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from alerts.core.db import make_engine  # noqa: E402
from bench._common import database, python_speed_us  # noqa: E402

NOW = datetime(2026, 5, 12, 12, 0, tzinfo=timezone.utc)
PER_USER = 50  # deliveries per user
EVENTS = 1000
RESULTS = ROOT / "bench" / "results"
LARGE_TABLES = ("user_alert_deliveries", "user_alert_digest_items", "user_alert_digests")

TABLES = ("user_channel_blocks, user_alert_digest_items, user_alert_digests, user_alert_deliveries, "
          "user_alert_prefs, alert_events, users")

# Delivery j of user u is for event 1 + (u % STRIDE) + STRIDE * j (STRIDE = EVENTS / PER_USER),
# so every event has the same number of deliveries. Its state is drawn from bucket
# b = (7u + 13j) % 100 (see STATES).
LOAD_SQL = [
    f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE",
    """INSERT INTO users (email, telegram_chat_id, phone, is_active, timezone, quiet_hours)
       SELECT 'user' || u || '@example.com', CASE WHEN u %% 2 = 0 THEN (100000 + u)::text END,
              CASE WHEN u %% 3 = 0 THEN '+3160' || lpad(u::text, 7, '0') END, u %% 100 <> 0,
              (ARRAY['Europe/Amsterdam', 'America/New_York', NULL])[u %% 3 + 1],
              CASE WHEN u %% 10 = 0 THEN '22:00-07:00' END
       FROM generate_series(1, %(users)s) AS u""",
    # The subscription the deliveries came from, one the user has on another channel
    # (not matching every event), and a digest subscription on email.
    """INSERT INTO user_alert_prefs (user_id, alert_type, region, min_severity, channel, delivery_kind, enabled)
       SELECT u, '*', '*', 1, (ARRAY['email', 'telegram', 'sms'])[u %% 3 + 1], 'instant', u %% 50 <> 1
       FROM generate_series(1, %(users)s) AS u
       UNION ALL
       SELECT u, 'type_' || (u %% 10), 'NL', 3, (ARRAY['telegram', 'sms', 'email'])[u %% 3 + 1], 'instant', true
       FROM generate_series(1, %(users)s) AS u
       UNION ALL
       SELECT u, 'price_spike', '*', 2, 'email', 'digest', true
       FROM generate_series(1, %(users)s) AS u WHERE u %% 3 <> 0""",
    """INSERT INTO alert_events (event_key, alert_type, region, severity, title, summary, url, status,
                                 reject_reason, collapse_key, created_at)
       SELECT 'bench-' || j, 'type_' || (j %% 10), (ARRAY['NL', 'DE', 'FR', 'GB'])[j %% 4 + 1], 1 + j %% 5,
              'Event ' || j, 'Flow reduced', 'https://energyriskiq.com/e/' || j,
              CASE WHEN j > %(events)s - 3 THEN 'new' WHEN j > %(events)s - 6 THEN 'ready'
                   WHEN j %% 97 = 0 THEN 'rejected' ELSE 'fanned_out' END,
              CASE WHEN j %% 97 = 0 THEN 'title: empty' END,
              CASE WHEN j %% 10 = 0 THEN 'story-' || (j / 50) END,
              timestamptz '2026-05-02 00:00:00+00' + j * interval '864 seconds'
       FROM generate_series(1, %(events)s) AS j""",
    """INSERT INTO user_alert_deliveries (user_id, alert_event_id, channel, delivery_kind, status, attempts,
                                          next_retry_at, last_error, sent_at, claimed_at, created_at)
       SELECT s.u, s.e, CASE WHEN s.b BETWEEN 60 AND 69 AND s.u %% 3 = 2 THEN 'email'
                             ELSE (ARRAY['email', 'telegram', 'sms'])[s.u %% 3 + 1] END,
              CASE WHEN s.b BETWEEN 60 AND 69 THEN 'digest' ELSE 'instant' END,
              CASE WHEN s.b < 60 THEN 'sent' WHEN s.b < 70 THEN 'skipped' WHEN s.b < 75 THEN 'failed'
                   WHEN s.b < 90 THEN 'skipped' WHEN s.b < 98 THEN 'queued' ELSE 'sending' END,
              CASE WHEN s.b < 60 THEN 1 WHEN s.b BETWEEN 70 AND 74 THEN 5 WHEN s.b BETWEEN 94 AND 96 THEN 2
                   WHEN s.b >= 98 THEN 1 ELSE 0 END,
              CASE WHEN s.b BETWEEN 90 AND 93 THEN s.t + interval '8 hours'
                   WHEN s.b BETWEEN 94 AND 96 THEN s.t + interval '10 minutes' END,
              CASE WHEN s.b BETWEEN 60 AND 69 THEN 'batched_into_digest'
                   WHEN s.b BETWEEN 70 AND 74 THEN 'smtp 550 5.7.1 message content rejected'
                   WHEN s.b BETWEEN 75 AND 79 THEN 'superseded by #' || (s.e + 1)
                   WHEN s.b BETWEEN 80 AND 83 THEN 'unsubscribed'
                   WHEN s.b BETWEEN 84 AND 86 THEN 'destination_disabled: smtp 550 5.1.1 mailbox unavailable'
                   WHEN s.b BETWEEN 87 AND 89 THEN 'recipient has no telegram_chat_id'
                   WHEN s.b BETWEEN 94 AND 96 THEN 'smtp 451 4.3.0 try later' END,
              CASE WHEN s.b < 60 THEN s.t + interval '2 seconds' END,
              CASE WHEN s.b >= 98 THEN s.t + interval '3 seconds' END,
              s.t
       FROM (SELECT u, 1 + (u %% %(stride)s) + %(stride)s * j AS e, (7 * u + 13 * j) %% 100 AS b,
                    timestamptz '2026-05-02 00:00:05+00' + (1 + (u %% %(stride)s) + %(stride)s * j)
                        * interval '864 seconds' AS t
             FROM generate_series(1, %(users)s) AS u, generate_series(0, %(per_user)s - 1) AS j) AS s""",
    # One daily digest per (user, channel, Amsterdam day) of the digest deliveries, sent
    # a minute after its window closed (every tenth one failed).
    """INSERT INTO user_alert_digests (user_id, channel, period, window_start, window_end, digest_key, status,
                                       attempts, last_error, sent_at, next_retry_at, created_at)
       SELECT user_id, channel, 'daily', w, w + interval '1 day',
              'daily:' || user_id || ':' || channel || ':' || to_char(w AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
              CASE WHEN user_id %% 10 = 0 THEN 'failed' ELSE 'sent' END,
              CASE WHEN user_id %% 10 = 0 THEN 5 ELSE 1 END,
              CASE WHEN user_id %% 10 = 0 THEN 'smtp 554 5.7.1 message content rejected' END,
              CASE WHEN user_id %% 10 <> 0 THEN w + interval '1 day 1 minute' END,
              w + interval '1 day', min(created_at)
       FROM (SELECT user_id, channel, created_at,
                    date_trunc('day', created_at AT TIME ZONE 'Europe/Amsterdam') AT TIME ZONE 'Europe/Amsterdam' AS w
             FROM user_alert_deliveries WHERE delivery_kind = 'digest') AS d
       GROUP BY user_id, channel, w""",
    """INSERT INTO user_alert_digest_items (digest_id, delivery_id)
       SELECT g.id, d.id FROM user_alert_deliveries d
       JOIN user_alert_digests g ON g.user_id = d.user_id AND g.channel = d.channel
        AND g.window_start = date_trunc('day', d.created_at AT TIME ZONE 'Europe/Amsterdam')
                             AT TIME ZONE 'Europe/Amsterdam'
       WHERE d.delivery_kind = 'digest'""",
    """INSERT INTO user_channel_blocks (user_id, channel, address, reason, created_at)
       SELECT u, 'email', 'user' || u || '@example.com', 'smtp 550 5.1.1 mailbox unavailable',
              timestamptz '2026-05-05 00:00:00+00'
       FROM generate_series(7, %(users)s, 100) AS u""",
]
COUNT_SQL = """
    SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM user_alert_prefs), (SELECT count(*) FROM alert_events),
           (SELECT count(*) FROM user_alert_deliveries), (SELECT count(*) FROM user_alert_digests),
           (SELECT count(*) FROM user_alert_digest_items), (SELECT count(*) FROM user_channel_blocks),
           pg_size_pretty(pg_total_relation_size('user_alert_deliveries'))"""


def main() -> None:
    args = _parse()
    result = {"date": date.today().isoformat(), "machine": _machine()}
    with database(args.database_url, prefix="alerts_bench_explain") as url:
        engine = make_engine(url, isolation_level="AUTOCOMMIT")
        result["fixture"] = _load(engine, args.deliveries)
        engine.dispose()
        engine = make_engine(url)  # as the command and the web app have it
        result["explain"] = _bench_explain(engine, url, args.samples)
        result["explain_cli"] = _bench_cli(url, result["explain"]["pairs"][:args.cli_runs])
        result["metrics"] = _bench_metrics(engine, url, args.scrapes)
        engine.dispose()
    del result["explain"]["pairs"]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"explain-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    _report(result)
    print(f"written to {path.relative_to(ROOT)}")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deliveries", type=int, default=1_000_000, help="deliveries (default: 1000000)")
    p.add_argument("--samples", type=int, default=200, help="explains timed in-process (default: 200)")
    p.add_argument("--cli-runs", type=int, default=5, help="`alerts explain` processes timed (default: 5)")
    p.add_argument("--scrapes", type=int, default=20, help="GET /metrics timed (default: 20)")
    p.add_argument("--database-url", help="PostgreSQL URL to use (its alert tables are emptied); "
                                          "default: a throwaway database on 127.0.0.1")
    args = p.parse_args()
    if args.deliveries < PER_USER:
        p.error(f"--deliveries must be at least {PER_USER}")
    return args


def _machine() -> dict:
    # The load average says how much else ran: on a shared host the times move with it.
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "python_speed_us": python_speed_us(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


# --- the fixture ------------------------------------------------------------------------------------

def _load(engine, deliveries: int) -> dict:
    params = {"users": deliveries // PER_USER, "per_user": PER_USER, "events": EVENTS, "stride": EVENTS // PER_USER}
    print(f"[bench] loading {params['users'] * PER_USER:,} deliveries of {params['users']:,} users", file=sys.stderr)
    started = time.perf_counter()
    with engine.connect() as conn:
        for sql in LOAD_SQL:
            conn.exec_driver_sql(sql, params)
        load_s = time.perf_counter() - started
        conn.exec_driver_sql("VACUUM ANALYZE")
        users, prefs, events, rows, digests, items, blocks, size = conn.exec_driver_sql(COUNT_SQL).one()
        by_status = dict(conn.exec_driver_sql(
            "SELECT delivery_kind || '/' || status, count(*) FROM user_alert_deliveries GROUP BY 1 ORDER BY 1").all())
        version = conn.exec_driver_sql("SHOW server_version").scalar()
    print(f"[bench] loaded in {load_s:.1f} s (+ VACUUM ANALYZE {time.perf_counter() - started - load_s:.1f} s)",
          file=sys.stderr)
    return {"users": users, "prefs": prefs, "events": events, "deliveries": rows, "digests": digests,
            "digest_items": items, "blocks": blocks, "deliveries_table_size": size, "by_status": by_status,
            "load_seconds": round(load_s, 1), "postgresql": version}


# --- explain ------------------------------------------------------------------------------------------

def _pairs(engine, n: int) -> list[tuple[int, int]]:
    """Half (user, event) pairs with a delivery, half at random; the same on every run."""
    rng = random.Random(23)
    with engine.connect() as conn:
        top = conn.exec_driver_sql("SELECT max(id) FROM user_alert_deliveries").scalar()
        users = conn.exec_driver_sql("SELECT max(id) FROM users").scalar()
        ids = [rng.randint(1, top) for _ in range(n - n // 2)]
        delivered = conn.execute(sa.text("SELECT user_id, alert_event_id FROM user_alert_deliveries "
                                         "WHERE id = ANY(:ids)"), {"ids": ids}).all()
    return [tuple(p) for p in delivered] + [(rng.randint(1, users), rng.randint(1, EVENTS)) for _ in range(n // 2)]


def _bench_explain(engine, url: str, samples: int) -> dict:
    from alerts.core.settings import Settings
    from alerts.operations.explain import explain, render

    settings = Settings.from_env({"DATABASE_URL": url})
    pairs = _pairs(engine, samples)
    statements: list[tuple[str, dict]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    with engine.connect() as conn:  # warm the pool and the statement cache, capture one explain's queries
        sa.event.listen(conn, "before_cursor_execute", capture)
        explain(conn, *pairs[0], settings, NOW)
        sa.event.remove(conn, "before_cursor_execute", capture)
    seq_scans = _seq_scans(engine, statements)
    times, delivered = [], 0
    for user_id, event_id in pairs:
        started = time.perf_counter()
        with engine.connect() as conn:
            report = explain(conn, user_id, event_id, settings, NOW)
        render(report), json.dumps(report)
        times.append((time.perf_counter() - started) * 1000)
        delivered += any(c["delivery"] for c in report["channels"])
    print(f"[bench] {len(times)} explains, {delivered} with a delivery", file=sys.stderr)
    return {"samples": len(times), "with_a_delivery": delivered, **_summary(times),
            "statements_per_explain": len(statements), "seq_scans_of_large_tables": seq_scans, "pairs": pairs}


def _seq_scans(engine, statements: list[tuple[str, dict]]) -> list[str]:
    """Sequential scans of the large tables in the plans of ``statements``."""
    found = []
    with engine.connect() as conn:
        for statement, parameters in statements:
            (plan,), = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).one()
            found += [f"{node['Node Type']} on {node['Relation Name']}" for node in _nodes(plan["Plan"])
                      if "Seq Scan" in node["Node Type"] and node.get("Relation Name") in LARGE_TABLES]
    return found


def _nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _bench_cli(url: str, pairs: list[tuple[int, int]]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALERTS_", "DATABASE_URL"))}
    env.update(DATABASE_URL=url, PYTHONPATH=str(ROOT))
    times, baseline = [], []
    for user_id, event_id in pairs:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "alerts", "explain", "--user", str(user_id), "--event", str(event_id)],
                       env=env, check=True, capture_output=True)
        times.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()  # the same process start with nothing to do: imports, no database
        subprocess.run([sys.executable, "-m", "alerts", "--version"], env=env, check=True, capture_output=True)
        baseline.append((time.perf_counter() - started) * 1000)
    return {"runs": len(times), **_summary(times), "alerts_version_median_ms": round(statistics.median(baseline), 2)}


# --- /metrics --------------------------------------------------------------------------------------------

def _bench_metrics(engine, url: str, scrapes: int) -> dict:
    from dataclasses import replace

    from alerts.core.settings import Settings
    from alerts.operations import metrics as ops
    from alerts.web import create_app

    settings = replace(Settings.from_env({"DATABASE_URL": url}), secret_key="b" * 32, metrics_token="bench")
    client = create_app(settings, engine=engine).test_client()
    headers = {"Authorization": "Bearer bench"}
    body = client.get("/metrics", headers=headers)  # warm
    assert body.status_code == 200, body.status_code
    times = []
    for _ in range(scrapes):
        started = time.perf_counter()
        response = client.get("/metrics", headers=headers)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    families, plans = {}, {}
    for family in ops.FAMILIES:
        statements: list[tuple[str, dict]] = []

        def capture(conn, cursor, statement, parameters, context, executemany):
            statements.append((statement, parameters))

        runs = []
        for _ in range(5):
            with engine.connect() as conn:
                sa.event.listen(conn, "before_cursor_execute", capture)
                started = time.perf_counter()
                family(conn, datetime.now(timezone.utc), settings.sending_lease_seconds)
                runs.append((time.perf_counter() - started) * 1000)
        families[family.__name__] = round(statistics.median(runs), 2)
        plans[family.__name__] = _scans(engine, statements[-1])
    print(f"[bench] {scrapes} scrapes", file=sys.stderr)
    return {"scrapes": scrapes, **_summary(times), "bytes": len(body.data), "family_median_ms": families,
            "family_scans": plans}


def _scans(engine, statement: tuple[str, dict]) -> list[str]:
    with engine.connect() as conn:
        (plan,), = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement[0], statement[1]).one()
    return sorted({f"{n['Node Type']} on {n['Relation Name']}" + (f" ({n['Index Name']})" if "Index Name" in n else "")
                   for n in _nodes(plan["Plan"]) if "Relation Name" in n})


# --- report ---------------------------------------------------------------------------------------------------

def _summary(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"median_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 2),
            "max_ms": round(ordered[-1], 2)}


def _report(r: dict) -> None:
    f, e, c, mx = r["fixture"], r["explain"], r["explain_cli"], r["metrics"]
    print(f"fixture: {f['deliveries']:,} deliveries ({f['deliveries_table_size']}), {f['users']:,} users, "
          f"{f['prefs']:,} subscriptions, {f['events']:,} events, {f['digests']:,} digests "
          f"({f['digest_items']:,} items), {f['blocks']:,} blocks; PostgreSQL {f['postgresql']}; "
          f"python_speed_us {r['machine']['python_speed_us']}, load average {r['machine']['load_average_1m_at_start']}")
    print(f"explain (in process, {e['samples']} pairs, {e['with_a_delivery']} with a delivery, "
          f"{e['statements_per_explain']} statements each): median {e['median_ms']} ms, p95 {e['p95_ms']} ms, "
          f"max {e['max_ms']} ms; sequential scans of large tables: {e['seq_scans_of_large_tables'] or 'none'}")
    print(f"alerts explain (a new process, {c['runs']} runs): median {c['median_ms']} ms, max {c['max_ms']} ms "
          f"(alerts --version, the same start with nothing to do: {c['alerts_version_median_ms']} ms)")
    print(f"GET /metrics ({mx['scrapes']} scrapes, {mx['bytes']} bytes): median {mx['median_ms']} ms, "
          f"p95 {mx['p95_ms']} ms, max {mx['max_ms']} ms")
    for name, ms in mx["family_median_ms"].items():
        print(f"  {name:<22} {ms:>8.2f} ms  {'; '.join(mx['family_scans'][name])}")


if __name__ == "__main__":
    main()
