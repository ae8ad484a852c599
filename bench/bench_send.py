"""Benchmark Phase C sending instant email, next to a bare smtplib loop.

    python bench/bench_send.py [--deliveries 5000] [--rounds 3] [--profile FILE]

In one run, against one aiosmtpd server (tests/support/fakes/smtp_server.py, in a process of its
own so it never shares the GIL with a sender):
1. reference: one smtplib connection sending the first delivery's rendered message
   (the exact bytes Phase C sends for it) N times;
2. Phase C: ``run_phase_c`` over N queued instant email deliveries on PostgreSQL — claim
   in batches, render, send over one reused SMTP connection, and commit each outcome
   right after its send — timed in this process from the call until it returns;
3. the same through the cron runner, ``python -m alerts.runner --phase c``, timed from
   process start to exit (interpreter start-up and imports included).

Each round re-queues the rows and empties the server; sides alternate their order and
the best round of each counts. After every Phase C run the server must hold exactly N
messages with N distinct Message-IDs and the database N rows ``sent``.

Needs PostgreSQL (ALERTS_BENCH_PG_ADMIN_URL, default postgresql://postgres@127.0.0.1/postgres);
creates a throwaway database and drops it at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alerts.sending.outbox import INSTANT  # noqa: E402
from bench._common import (ROOT, SmtpServerProcess, bare_smtplib, create_database,  # noqa: E402
                           count_sent, drop_database, python_speed_us, sample_message, smtp_settings,
                           write_results)

TARGET_RATIO = 0.5


def seed(url: str, n: int) -> None:
    """n users, each with one queued instant email delivery of one of 50 events."""
    from alerts.core.db import make_engine

    created = datetime.now(timezone.utc) - timedelta(hours=1)
    engine = make_engine(url)
    with engine.begin() as conn:
        sql = conn.exec_driver_sql
        sql("INSERT INTO users (email) SELECT 'user' || n || '@example.com' FROM generate_series(1, %s) n", (n,))
        sql("""INSERT INTO alert_events (event_key, alert_type, region, severity, title, summary, url, status,
                                         created_at)
               SELECT 'bench-' || n, 'pipeline_outage', 'NL', 1 + n %% 5,
                      'Event ' || n || ': flow cut at Emden after a compressor trip',
                      'Flow reduced by 30%% for at least six hours; traders expect TTF to react',
                      'https://energyriskiq.com/e/' || n, 'fanned_out', %s
               FROM generate_series(1, 50) n""", (created,))
        sql("""INSERT INTO user_alert_deliveries (user_id, alert_event_id, channel, delivery_kind, status)
               SELECT u.id, 1 + (u.id %% 50), 'email', 'instant', 'queued' FROM users u""")
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()


def requeue(url: str) -> None:
    from alerts.core.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("""UPDATE user_alert_deliveries SET status = 'queued', attempts = 0, sent_at = NULL,
                                       next_retry_at = NULL, last_error = NULL, claimed_at = NULL""")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE user_alert_deliveries")
    engine.dispose()


def phase_c_in_process(url: str, port: int, profile: str | None) -> tuple[float, dict]:
    from alerts.channels.registry import build_channels
    from alerts.core.db import Database, make_engine
    from alerts.core.clock import Clock
    from alerts.phases.send import run_phase_c

    settings = smtp_settings(url, port)
    engine = make_engine(url)
    channels = build_channels(settings)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    started = time.perf_counter()
    try:
        if profiler:
            profiler.enable()
        counts = run_phase_c(Database(engine), Clock(), settings, channels)
        seconds = time.perf_counter() - started
    finally:
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        channels.close()
        engine.dispose()
    return seconds, counts


def phase_c_runner(url: str, port: int) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALERTS_", "CELERY_", "DATABASE_URL"))}
    env.update(DATABASE_URL=url, ALERTS_SMTP_HOST="127.0.0.1", ALERTS_SMTP_PORT=str(port), ALERTS_SMTP_TLS="none")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "alerts.runner", "--phase", "c", "--json"], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return seconds, json.loads(done.stdout)["c"]


def check(server: SmtpServerProcess, url: str, n: int, counts: dict) -> dict:
    ids = server.ask("ids")
    sizes = server.ask("sizes")
    result = {"at_server": len(ids), "distinct_ids": len(set(ids)), "rows_sent": count_sent(url, "user_alert_deliveries"),
              "mean_size": round(sum(sizes) / max(1, len(sizes)))}
    if counts["instant"]["sent"] != n or result["at_server"] != n or result["distinct_ids"] != n \
            or result["rows_sent"] != n:
        raise SystemExit(f"Phase C did not send each of the {n} deliveries exactly once: {counts} {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side; the best counts")
    parser.add_argument("--no-runner", action="store_true", help="skip the runner-subprocess side")
    parser.add_argument("--profile", help="write a cProfile of the last in-process Phase C run here")
    options = parser.parse_args()
    n = options.deliveries

    server = SmtpServerProcess()
    url = create_database("alerts_bench_send")
    speed = python_speed_us()
    times: dict[str, list[float]] = {"bare_smtplib": [], "phase_c": [], "runner": []}
    sizes = {}
    try:
        seed(url, n)
        sender, recipient, data = sample_message(url, server.port, INSTANT)
        sides = ["bare_smtplib", "phase_c"] + ([] if options.no_runner else ["runner"])
        for round_no in range(options.rounds):
            order = sides if round_no % 2 == 0 else sides[::-1]
            for side in order:
                print(f"[bench] round {round_no + 1}: {side}", file=sys.stderr)
                server.ask("reset")
                if side == "bare_smtplib":
                    times[side].append(bare_smtplib(server.port, sender, recipient, data, n))
                    if server.ask("count") != n:
                        raise SystemExit("the server did not receive every reference message")
                    sizes[side] = round(sum(server.ask("sizes")) / n)
                    continue
                requeue(url)
                if side == "phase_c":
                    seconds, counts = phase_c_in_process(url, server.port, options.profile)
                    counts = {"instant": counts["instant"]}
                else:
                    seconds, counts = phase_c_runner(url, server.port)
                sizes[side] = check(server, url, n, counts)["mean_size"]
                times[side].append(seconds)
    finally:
        server.stop()
        drop_database(url)

    bare = n / min(times["bare_smtplib"])
    report = {"deliveries": n, "rounds": options.rounds,
              "bare_smtplib_per_s": round(bare, 1),
              "phase_c_per_s": round(n / min(times["phase_c"]), 1),
              "ratio": round(n / min(times["phase_c"]) / bare, 3)}
    if times["runner"]:
        report["runner_per_s"] = round(n / min(times["runner"]), 1)
        report["runner_ratio"] = round(n / min(times["runner"]) / bare, 3)
    report["mean_message_bytes"] = sizes
    report["all_rounds_s"] = {k: [round(t, 3) for t in v] for k, v in times.items() if v}
    report["target"] = f"phase_c / bare_smtplib >= {TARGET_RATIO}: {'met' if report['ratio'] >= TARGET_RATIO else 'NOT met'}"
    report["python_speed_us"] = speed
    print(json.dumps(report, indent=2))
    write_results("send", report, python_speed_us=speed)


if __name__ == "__main__":
    main()
