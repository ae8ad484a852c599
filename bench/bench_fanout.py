"""Benchmark Phase B (fan-out) on PostgreSQL against one hand-written INSERT … SELECT.

    python bench/bench_fanout.py --users 50000 --events 200 --match-ratio 0.1 [--bypass-severity 4]
    python bench/bench_fanout.py --collapse-stories 10 --quiet-share 0.3   # collapse, quiet hours

Bulk-loads users, preferences and ready events (generate_series, no Python loops) so
that each user's preferences match about ``--match-ratio`` of the events (the default
gives about 1M deliveries), with the features Phase B must handle mixed in: three
channels, digest prefs, an overlapping '*' digest pref for a quarter of the users
(instant must win), sms+digest, inactive users and disabled prefs. Then:

1. times ``run_phase_b`` in a child process, whose peak RSS is read from
   ``getrusage(RUSAGE_CHILDREN)`` — Phase B's own process, not this one's;
2. resets (deliveries emptied, events back to ``ready``) and times the reference: one
   hand-written ``INSERT … SELECT … ON CONFLICT DO NOTHING`` plus the UPDATE of the
   events to ``fanned_out``, on the same database in the same run;
3. checks both left identical deliveries; repeats for ``--rounds`` (alternating who goes
   first) and prints the medians. On a shared host wall time is noisy, so the PostgreSQL
   backend's own CPU time is printed too when the server runs on this machine.

Without ``--database-url`` it creates a throwaway database on 127.0.0.1 and drops it at
the end. With one, that database is migrated and its alert tables are EMPTIED.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from alerts.core.db import make_engine  # noqa: E402
from bench._common import database, write_results  # noqa: E402

NOW = datetime(2026, 5, 12, 12, 0, tzinfo=timezone.utc)
TARGET_RATIO, TARGET_RSS_MB = 1.3, 200

TABLES = ("user_alert_digest_items, user_alert_digests, user_alert_deliveries, user_alert_prefs, "
          "alert_events, users")

# Event j has type type_(j % K) and user i's main pref is for type_(i % K), K = 1/ratio,
# so each user matches about one event in K. Every 4th user also has a '*' digest pref
# on the same channel for severity-5 events in one region, which overlaps the main pref
# (instant wins) and adds a few digest-only deliveries; every 5th main pref is a digest
# (sms+digest ⇒ skipped). 1% of users are inactive, 2% of main prefs disabled.
LOAD_SQL = [
    f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE",
    """INSERT INTO users (email, telegram_chat_id, phone, is_active)
       SELECT 'user' || i || '@example.com',
              CASE WHEN i %% 2 = 0 THEN (100000 + i)::text END,
              CASE WHEN i %% 3 = 0 THEN '+3160' || lpad(i::text, 7, '0') END,
              i %% 100 <> 0
       FROM generate_series(1, %(users)s) AS i""",
    """INSERT INTO user_alert_prefs (user_id, alert_type, region, min_severity, channel, delivery_kind, enabled)
       SELECT i, 'type_' || (i %% %(types)s), '*', 1,
              (ARRAY['email', 'telegram', 'sms'])[i %% 3 + 1],
              CASE WHEN i %% 5 = 0 THEN 'digest' ELSE 'instant' END,
              i %% 50 <> 1
       FROM generate_series(1, %(users)s) AS i""",
    """INSERT INTO user_alert_prefs (user_id, alert_type, region, min_severity, channel, delivery_kind)
       SELECT i, '*', (ARRAY['NL', 'DE', 'FR', 'GB'])[(i / 4) %% 4 + 1], 5,
              (ARRAY['email', 'telegram', 'sms'])[i %% 3 + 1], 'digest'
       FROM generate_series(4, %(users)s, 4) AS i""",
    """INSERT INTO alert_events (event_key, alert_type, region, severity, title, summary, url, status, created_at)
       SELECT 'bench-' || j, 'type_' || (j %% %(types)s), (ARRAY['NL', 'DE', 'FR', 'GB'])[j %% 4 + 1],
              1 + j %% 5, 'Event ' || j, 'Flow reduced', 'https://energyriskiq.com/e/' || j, 'ready',
              timestamptz '2026-05-12 00:00:00+00' + j * interval '1 minute'
       FROM generate_series(1, %(events)s) AS j""",
]

RESET_SQL = [
    "TRUNCATE user_alert_digest_items, user_alert_deliveries",
    "UPDATE alert_events SET status = 'ready'",
]

# What one would write by hand for this job on PostgreSQL.
REFERENCE_SQL = [
    """INSERT INTO user_alert_deliveries
           (user_id, alert_event_id, channel, delivery_kind, status, last_error, created_at, next_retry_at)
       SELECT p.user_id, e.id, p.channel,
              CASE WHEN {instant} THEN 'instant' ELSE 'digest' END,
              CASE WHEN p.channel = 'sms' AND NOT {instant} THEN 'skipped' ELSE 'queued' END,
              CASE WHEN p.channel = 'sms' AND NOT {instant} THEN 'sms_digest_not_supported' END,
              %(now)s, {held}
       FROM alert_events e
       JOIN user_alert_prefs p ON (p.alert_type = e.alert_type OR p.alert_type = '*')
                              AND (p.region = e.region OR p.region = '*')
                              AND e.severity >= p.min_severity
       JOIN users u ON u.id = p.user_id
       WHERE e.status = 'ready' AND p.enabled AND u.is_active
       GROUP BY p.user_id, e.id, p.channel, u.timezone, u.quiet_hours
       ON CONFLICT (user_id, alert_event_id, channel) DO NOTHING""",
    "UPDATE alert_events SET status = 'fanned_out' WHERE status = 'ready'",
]


# Quiet hours by hand (docs/policy.md), for the periods the benchmark loads: they do not wrap
# midnight and no DST change falls in them, so plain AT TIME ZONE arithmetic is right.
HELD_SQL = """CASE WHEN {instant} AND e.severity < 5 AND u.quiet_hours IS NOT NULL
        AND (%(now)s AT TIME ZONE coalesce(u.timezone, 'Europe/Amsterdam'))::time
            >= split_part(u.quiet_hours, '-', 1)::time
        AND (%(now)s AT TIME ZONE coalesce(u.timezone, 'Europe/Amsterdam'))::time
            < split_part(u.quiet_hours, '-', 2)::time
      THEN ((%(now)s AT TIME ZONE coalesce(u.timezone, 'Europe/Amsterdam'))::date
            + split_part(u.quiet_hours, '-', 2)::time) AT TIME ZONE coalesce(u.timezone, 'Europe/Amsterdam') END"""
# The supersede by hand (docs/policy.md, collapse): every event is new here, so every group is touched.
SUPERSEDE_SQL = """
    UPDATE user_alert_deliveries d
       SET status = 'skipped', last_error = 'superseded by #' || r.newest
      FROM (SELECT d.id, row_number() OVER w AS rank, first_value(e.id) OVER w AS newest
              FROM user_alert_deliveries d JOIN alert_events e ON e.id = d.alert_event_id
             WHERE d.delivery_kind = 'instant' AND e.collapse_key IS NOT NULL
            WINDOW w AS (PARTITION BY d.user_id, d.channel, e.collapse_key
                         ORDER BY e.created_at DESC, e.id DESC)) r
     WHERE d.id = r.id AND r.rank > 1 AND d.status = 'queued'"""


def reference_sql(bypass_severity: int | None, quiet: bool = False, collapse: bool = False) -> list[str]:
    """The hand-written statements; with a bypass severity (docs/policy.md) a digest pref
    matching an event at or above it makes an instant delivery; with quiet hours and
    collapse keys loaded, the held deliveries and the supersede."""
    instant = "bool_or(p.delivery_kind = 'instant')"
    if bypass_severity is not None:
        instant = f"({instant} OR e.severity >= {int(bypass_severity)})"
    held = HELD_SQL if quiet else "NULL::timestamptz"
    statements = [sql.replace("{held}", held).replace("{instant}", instant) for sql in REFERENCE_SQL]
    if collapse:
        statements.insert(1, SUPERSEDE_SQL)
    return statements

# What both runs must leave behind, compared after each.
OUTCOME_SQL = """
    SELECT (SELECT count(*) FROM user_alert_deliveries),
           (SELECT count(*) FROM alert_events WHERE status = 'fanned_out'),
           (SELECT md5(string_agg(concat_ws('|', user_id, alert_event_id, channel, delivery_kind, status,
                                            last_error, next_retry_at),
                                  ',' ORDER BY user_id, alert_event_id, channel))
              FROM user_alert_deliveries),
           (SELECT count(*) FILTER (WHERE last_error = 'sms_digest_not_supported') FROM user_alert_deliveries),
           (SELECT count(*) FILTER (WHERE delivery_kind = 'digest') FROM user_alert_deliveries),
           -- One created_at for the whole run; not compared, since Phase B's is the run's clock,
           -- which has moved on a few milliseconds from NOW by the time it reads it.
           (SELECT count(DISTINCT created_at) FROM user_alert_deliveries),
           (SELECT count(*) FILTER (WHERE left(last_error, 14) = 'superseded by ') FROM user_alert_deliveries),
           (SELECT count(*) FILTER (WHERE next_retry_at IS NOT NULL) FROM user_alert_deliveries)
"""


def main() -> None:
    args = _parse()
    if args.child:
        return _child(args.database_url, args.bypass_severity)
    with database(args.database_url) as url:
        engine = make_engine(url, isolation_level="AUTOCOMMIT")
        result = _measure(engine, url, args)
        engine.dispose()
    summary = _report(result)
    if args.bypass_severity is not None:
        print(f"both with ALERTS_DIGEST_BYPASS_SEVERITY={args.bypass_severity}")
    if args.collapse_stories or args.quiet_share:
        print(f"collapse stories {args.collapse_stories}, quiet-hours share {args.quiet_share:g}: "
              f"superseded {result['superseded']}, held {result['held']}")
    options = {key: getattr(args, key) for key in ("users", "events", "match_ratio", "rounds", "bypass_severity",
                                                   "collapse_stories", "quiet_share")}
    write_results("fanout", {"options": options, **summary, **result})


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=50_000, help="users (default: 50000)")
    p.add_argument("--events", type=int, default=200, help="ready events (default: 200)")
    p.add_argument("--match-ratio", type=float, default=0.1,
                   help="share of the events each user's main preference matches (default: 0.1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure both this many times, alternating which goes first; medians are "
                        "reported (default: 3)")
    p.add_argument("--database-url", help="PostgreSQL URL to use (its alert tables are emptied); "
                                          "default: a throwaway database on 127.0.0.1")
    p.add_argument("--bypass-severity", type=int, choices=range(1, 6), metavar="N",
                   help="run both with ALERTS_DIGEST_BYPASS_SEVERITY=N (default: unset)")
    p.add_argument("--collapse-stories", type=int, default=0, metavar="N",
                   help="give every event one of N collapse keys (default: none)")
    p.add_argument("--quiet-share", type=float, default=0.0, metavar="F",
                   help="give this share of the users quiet hours 10:00-18:00 in one of three zones, "
                        "two of which are inside them at the benchmark's now (default: 0)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.child and not 0 < args.match_ratio <= 1:
        p.error("--match-ratio must be in (0, 1]")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def _measure(engine, url: str, args) -> dict:
    params = {"users": args.users, "events": args.events, "types": max(1, round(1 / args.match_ratio))}
    print(f"[bench] loading {args.users} users, {args.events} events", file=sys.stderr)
    with engine.connect() as conn:
        for sql in LOAD_SQL:
            conn.exec_driver_sql(sql, params)
        if args.collapse_stories:
            conn.exec_driver_sql("UPDATE alert_events SET collapse_key = 'story-' || (id %% %(n)s)",
                                 {"n": args.collapse_stories})
        if args.quiet_share:
            conn.exec_driver_sql(
                "UPDATE users SET quiet_hours = '10:00-18:00', "
                "timezone = (ARRAY['Europe/Amsterdam', 'America/New_York', 'UTC'])[id %% 3 + 1] "
                "WHERE id %% 1000 < %(share)s", {"share": round(args.quiet_share * 1000)})
    runs = {"phase_b": [], "reference": []}
    expected = None
    for n in range(args.rounds):
        # Alternate who goes first, so neither always gets the warmer cache.
        for which in ("phase_b", "reference") if n % 2 == 0 else ("reference", "phase_b"):
            _reset(engine)
            print(f"[bench] round {n + 1}: {which}", file=sys.stderr)
            run = _run_phase_b(url, args.bypass_severity) if which == "phase_b" else _run_reference(
                engine, reference_sql(args.bypass_severity, args.quiet_share > 0, args.collapse_stories > 0))
            with engine.connect() as conn:
                outcome = tuple(conn.exec_driver_sql(OUTCOME_SQL).one())
            expected = expected or outcome
            if outcome != expected:
                raise SystemExit(f"{which} left different deliveries: {outcome} vs {expected}")
            if which == "phase_b" and run["counts"] != {"events_fanned_out": outcome[1],
                                                        "deliveries_created": outcome[0]}:
                raise SystemExit(f"phase B's counts {run['counts']} do not match the table: {outcome[:2]}")
            runs[which].append(run)
            print(f"[bench]   {run['seconds']:.2f} s", file=sys.stderr)
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child, KiB on Linux
    return {"deliveries": expected[0], "events": expected[1], "skipped": expected[3], "digest": expected[4],
            "superseded": expected[6], "held": expected[7],
            "runs": runs, "rss_mb": rss_mb}


def _reset(engine) -> None:
    """Same starting point for every run: no deliveries, every event ready, fresh
    statistics, no dirty pages pending."""
    with engine.connect() as conn:
        for sql in RESET_SQL:
            conn.exec_driver_sql(sql)
        conn.exec_driver_sql("VACUUM ANALYZE")
        conn.exec_driver_sql("CHECKPOINT")


def _run_phase_b(url: str, bypass_severity: int | None) -> dict:
    bypass = [] if bypass_severity is None else ["--bypass-severity", str(bypass_severity)]
    child = subprocess.run([sys.executable, __file__, "--child", "--database-url", url, *bypass],
                           check=True, capture_output=True, text=True)
    return json.loads(child.stdout)


def _run_reference(engine, statements: list[str]) -> dict:
    with engine.connect() as conn:
        backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        cpu = _backend_cpu(backend)
        started = time.perf_counter()
        conn.exec_driver_sql("BEGIN")  # one transaction, as Phase B (the engine is AUTOCOMMIT)
        for sql in statements:
            conn.exec_driver_sql(sql, {"now": NOW})
        conn.exec_driver_sql("COMMIT")
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "backend_cpu_s": _cpu_delta(cpu, _backend_cpu(backend))}


def _child(url: str, bypass_severity: int | None) -> None:
    """Runs in its own process: Phase B once, then its time and counts as JSON."""
    from alerts.channels.registry import ChannelSet
    from alerts.core.clock import Clock
    from alerts.core.settings import Settings
    from alerts.core.db import Database
    from alerts.phases.fanout import run_phase_b

    env = {"DATABASE_URL": url}
    if bypass_severity is not None:
        env["ALERTS_DIGEST_BYPASS_SEVERITY"] = str(bypass_severity)
    settings = Settings.from_env(env)
    engine = make_engine(url, pool_size=1, max_overflow=0)  # one connection: the backend measured
    with engine.connect() as conn:
        backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    cpu = _backend_cpu(backend)
    started = time.perf_counter()
    counts = run_phase_b(Database(engine), Clock(NOW), settings, ChannelSet())
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "backend_cpu_s": _cpu_delta(cpu, _backend_cpu(backend)),
                      "counts": counts}))


def _backend_cpu(pid: int) -> float | None:
    """CPU seconds the PostgreSQL backend has used, when the server runs on this machine
    and we may read its /proc entry: steadier than wall time on a busy host."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _cpu_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _report(r: dict) -> dict:
    """Print the table; the medians and the verdict, for the result file."""
    b, ref = r["runs"]["phase_b"], r["runs"]["reference"]
    b_s, ref_s = _median(b, "seconds"), _median(ref, "seconds")
    print(f"{'deliveries':>10} {'events':>7} {'phase B s':>10} {'reference s':>12} {'ratio':>6} {'peak RSS MB':>12}")
    print(f"{r['deliveries']:>10} {r['events']:>7} {b_s:>10.2f} {ref_s:>12.2f} {b_s / ref_s:>6.2f} "
          f"{r['rss_mb']:>12.1f}")
    print(f"medians of {len(b)} round(s); wall seconds phase B {_list(b, 'seconds')}, "
          f"reference {_list(ref, 'seconds')}")
    b_cpu, ref_cpu = _median(b, "backend_cpu_s"), _median(ref, "backend_cpu_s")
    if b_cpu is not None and ref_cpu:
        print(f"PostgreSQL backend CPU s: phase B {b_cpu:.2f}, reference {ref_cpu:.2f}, ratio {b_cpu / ref_cpu:.2f}")
    print(f"(of which digest {r['digest']}, skipped sms+digest {r['skipped']})")
    ok = b_s / ref_s <= TARGET_RATIO and r["rss_mb"] <= TARGET_RSS_MB
    print(f"targets (ratio <= {TARGET_RATIO}, peak RSS <= {TARGET_RSS_MB} MB): {'met' if ok else 'NOT met'}")
    return {"phase_b_s": round(b_s, 3), "reference_s": round(ref_s, 3), "ratio": round(b_s / ref_s, 3),
            "backend_cpu_s": {"phase_b": b_cpu, "reference": ref_cpu,
                              "ratio": round(b_cpu / ref_cpu, 3) if b_cpu is not None and ref_cpu else None},
            "target": f"ratio <= {TARGET_RATIO}, peak RSS <= {TARGET_RSS_MB} MB: {'met' if ok else 'NOT met'}"}


def _median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run[key] is not None]
    return statistics.median(values) if values else None


def _list(runs: list[dict], key: str) -> str:
    return " ".join(f"{run[key]:.2f}" for run in runs)


if __name__ == "__main__":
    main()
