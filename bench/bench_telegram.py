"""Benchmark: what the Telegram limiter costs the runner's Phase C, and that it holds
Telegram's limit.

    python bench/bench_telegram.py [--sends 2000] [--latency 0.005] [--rounds 3] [--real-rate-sends 150]

Before each Telegram send Phase C asks the limiter (``channels.limiter``, set by the
runner's session: the Redis ``TelegramLimiter`` the Celery workers share when Redis
answers, else the in-process ``LocalLimiter``; alerts/sending/ratelimit.py). This
seeds ``--sends`` queued instant Telegram deliveries, each to a chat of its own, and runs
Phase C (``run_phase_c``, in this process) over them through the real TelegramChannel
to the Bot API fake (tests/support/fakes/provider_api.py, in a process of its own,
answering after ``--latency`` seconds), with:

1. no limiter (``channels.limiter = None``);
2. the ``LocalLimiter``;
3. the Redis ``TelegramLimiter`` (ALERTS_BENCH_BROKER_URL's Redis, keys under a prefix
   of their own);

both limiters built with a global rate far above what one runner sends
(``Rate(1000, burst=1000)``), so they never make it wait and what differs is only the
cost of asking. The three alternate their order over ``--rounds``; medians are reported:
sends/s, and CPU milliseconds per send of this process (the runner), of Redis and of
PostgreSQL (the whole server). Each run must leave every delivery ``sent`` and the fake
must have one message per chat.

Then, with Telegram's real rates (25/s, bursts of 5; one per second per chat), each
limiter sends ``--real-rate-sends`` messages: the sends/s and the most sends in any one
second at the fake show the limit held (at most 30 in any second).

Needs PostgreSQL (ALERTS_BENCH_PG_ADMIN_URL, default postgresql://postgres@127.0.0.1/postgres)
and Redis (ALERTS_BENCH_BROKER_URL, default redis://127.0.0.1:6379/13; only keys under
this run's prefix are written). Results: bench/results/telegram-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (ProviderApiProcess, busy_cores, count_sent, create_database,  # noqa: E402
                           drop_database, postgres_cpu, postmaster_pid, python_speed_us, redis_cpu, write_results)

VARIANTS = ("none", "local", "redis")
HIGH_RATE = (1000, 1000)  # per second, burst: far above one runner's pace
MOST_IN_ANY_SECOND = 30  # Telegram's bulk limit: 25/s with bursts of 5


def seed(url: str, n: int) -> None:
    """n users, each with a Telegram chat of its own and one queued instant Telegram delivery
    of one of 50 events."""
    from alerts.core.db import make_engine

    created = datetime.now(timezone.utc) - timedelta(hours=1)
    engine = make_engine(url)
    with engine.begin() as conn:
        sql = conn.exec_driver_sql
        sql("""INSERT INTO users (email, telegram_chat_id)
               SELECT 'user' || n || '@example.com', (100000 + n)::text FROM generate_series(1, %s) n""", (n,))
        sql("""INSERT INTO alert_events (event_key, alert_type, region, severity, title, summary, url, status,
                                         created_at)
               SELECT 'bench-' || n, 'pipeline_outage', 'NL', 1 + n %% 5,
                      'Event ' || n || ': flow cut at Emden after a compressor trip',
                      'Flow reduced by 30%% for at least six hours; traders expect TTF to react',
                      'https://energyriskiq.com/e/' || n, 'fanned_out', %s
               FROM generate_series(1, 50) n""", (created,))
        sql("""INSERT INTO user_alert_deliveries (user_id, alert_event_id, channel, delivery_kind, status)
               SELECT u.id, 1 + (u.id %% 50), 'telegram', 'instant', 'queued' FROM users u""")
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()


def requeue(url: str, keep: int | None = None) -> None:
    """Every delivery queued again; with ``keep``, only the first ``keep`` (the rest skipped)."""
    from alerts.core.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("""UPDATE user_alert_deliveries SET status = 'queued', attempts = 0, sent_at = NULL,
                                       next_retry_at = NULL, last_error = NULL, claimed_at = NULL""")
        if keep is not None:
            conn.exec_driver_sql("UPDATE user_alert_deliveries SET status = 'skipped', last_error = 'bench' "
                                 "WHERE id > (SELECT min(id) FROM user_alert_deliveries) + %s - 1", (keep,))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE user_alert_deliveries")
    engine.dispose()


def limiter(variant: str, redis_client, real_rates: bool = False):
    """A fresh limiter (no booking left from an earlier run): a Redis one under a key prefix of its own."""
    from alerts.sending.ratelimit import LocalLimiter, Rate, TelegramLimiter

    rates = {} if real_rates else {"global_rate": Rate(*HIGH_RATE)}
    if variant == "local":
        return LocalLimiter(**rates)
    if variant == "redis":
        return TelegramLimiter(redis_client, prefix=f"alerts-bench:{uuid.uuid4().hex[:8]}", **rates)
    return None


def phase_c(url: str, api: ProviderApiProcess, redis_client, postmaster: int | None, variant: str, n: int,
            real_rates: bool = False) -> dict:
    """Phase C over ``n`` queued Telegram deliveries with ``variant``'s limiter: seconds and CPU."""
    from alerts.channels.registry import build_channels
    from alerts.core.clock import Clock
    from alerts.core.db import Database, make_engine
    from alerts.core.settings import Settings
    from alerts.phases.send import run_phase_c

    requeue(url, keep=n)
    api.ask("reset")
    settings = Settings.from_env({"DATABASE_URL": url, "ALERTS_TELEGRAM_BOT_TOKEN": api.bot_token,
                                  "ALERTS_TELEGRAM_API_BASE": api.telegram_api_base})
    engine = make_engine(url)
    channels = build_channels(settings)
    channels.limiter = limiter(variant, redis_client, real_rates)
    try:
        cpu, redis_before, pg_before = time.process_time(), redis_cpu(redis_client), postgres_cpu(postmaster)
        started = time.perf_counter()
        counts = run_phase_c(Database(engine), Clock(), settings, channels)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        redis_spent, pg_spent = redis_cpu(redis_client) - redis_before, postgres_cpu(postmaster) - pg_before
    finally:
        channels.close()
        engine.dispose()
    chats = api.ask("chats")
    sent = counts["instant"]["sent"]
    if sent != n or len(chats) != n or len(set(chats)) != n or count_sent(url, "user_alert_deliveries") != n:
        raise SystemExit(f"{variant}: Phase C did not send each of the {n} deliveries exactly once: "
                         f"{counts}, {len(chats)} messages to {len(set(chats))} chats at the fake")
    ms = 1000 / n
    return {"sends_per_s": round(n / seconds, 1), "seconds": round(seconds, 3),
            "cpu_ms_per_send": {"runner": round(cpu * ms, 3), "redis": round(redis_spent * ms, 3),
                                "postgresql": round(pg_spent * ms, 3)}}


def most_in_one_second(arrivals: list[float]) -> int:
    """The most requests that arrived within any one second."""
    arrivals, most, first = sorted(arrivals), 0, 0
    for last, at in enumerate(arrivals):
        while at - arrivals[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def real_rate_run(url, api, redis_client, postmaster, variant: str, n: int) -> dict:
    run = phase_c(url, api, redis_client, postmaster, variant, n, real_rates=True)
    arrivals = sorted(api.ask("arrivals"))
    busiest = most_in_one_second(arrivals)
    return {"sends": n, "sends_per_s": run["sends_per_s"],
            "sends_per_s_at_the_fake": round((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), 1),
            "most_in_any_second": busiest, "held": busiest <= MOST_IN_ANY_SECOND}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=2000, help="Telegram deliveries per run, each to its own chat")
    parser.add_argument("--latency", type=float, default=0.005, help="seconds the Bot API fake waits before answering")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant, order rotating; medians count")
    parser.add_argument("--real-rate-sends", type=int, default=150,
                        help="sends per limiter at Telegram's real rates (0: skip)")
    options = parser.parse_args()

    import redis
    redis_client = redis.Redis.from_url(os.environ.get("ALERTS_BENCH_BROKER_URL", "redis://127.0.0.1:6379/13"))
    api = ProviderApiProcess(delay=options.latency)
    url = create_database("alerts_bench_telegram")
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    real_rates = {}
    try:
        postmaster = postmaster_pid(url)
        seed(url, max(options.sends, options.real_rate_sends))
        background = busy_cores()
        speed = python_speed_us()
        phase_c(url, api, redis_client, postmaster, "none", min(200, options.sends))  # warm up: imports, templates
        for number in range(options.rounds):
            order = VARIANTS[number % 3:] + VARIANTS[:number % 3]
            for variant in order:
                print(f"[bench] round {number + 1}: {variant}", file=sys.stderr)
                runs[variant].append(phase_c(url, api, redis_client, postmaster, variant, options.sends))
        if options.real_rate_sends:
            for variant in ("local", "redis"):
                print(f"[bench] {variant} limiter at Telegram's real rates", file=sys.stderr)
                real_rates[variant] = real_rate_run(url, api, redis_client, postmaster, variant,
                                                    options.real_rate_sends)
    finally:
        api.stop()
        drop_database(url)

    def median(variant: str, *keys: str) -> float:
        def pick(run: dict):
            value = run
            for key in keys:
                value = value[key]
            return value
        return round(statistics.median(pick(run) for run in runs[variant]), 3)

    medians = {variant: {"sends_per_s": median(variant, "sends_per_s"),
                         "cpu_ms_per_send": {part: median(variant, "cpu_ms_per_send", part)
                                             for part in ("runner", "redis", "postgresql")}}
               for variant in VARIANTS}
    base = medians["none"]
    cost = {}
    for variant in ("local", "redis"):
        m = medians[variant]
        runner = m["cpu_ms_per_send"]["runner"] - base["cpu_ms_per_send"]["runner"]
        with_redis = runner + m["cpu_ms_per_send"]["redis"] - base["cpu_ms_per_send"]["redis"]
        cost[variant] = {"runner_cpu_ms_per_send": round(runner, 3),
                         "runner_cpu_percent": round(100 * runner / base["cpu_ms_per_send"]["runner"], 1),
                         "runner_and_redis_cpu_ms_per_send": round(with_redis, 3),
                         "throughput_ratio": round(m["sends_per_s"] / base["sends_per_s"], 3)}

    print(f"Phase C, {options.sends} Telegram sends to distinct chats, Bot API fake answering after "
          f"{options.latency * 1000:g} ms; medians of {options.rounds} rounds; python_speed_us {speed}, "
          f"busy cores before {background}")
    print(f"{'limiter':<8} {'sends/s':>8} {'runner CPU ms/send':>19} {'Redis ms/send':>14} {'PostgreSQL ms/send':>19}")
    for variant in VARIANTS:
        m = medians[variant]
        c = m["cpu_ms_per_send"]
        print(f"{variant:<8} {m['sends_per_s']:>8.1f} {c['runner']:>19.3f} {c['redis']:>14.3f} {c['postgresql']:>19.3f}")
    for variant, c in cost.items():
        print(f"{variant} limiter costs {c['runner_cpu_ms_per_send']:+.3f} ms of runner CPU per send "
              f"({c['runner_cpu_percent']:+.1f} %), {c['runner_and_redis_cpu_ms_per_send']:+.3f} ms with Redis's; "
              f"throughput x{c['throughput_ratio']}")
    for variant, r in real_rates.items():
        print(f"real rates, {variant} limiter: {r['sends']} sends at {r['sends_per_s_at_the_fake']}/s at the fake, "
              f"at most {r['most_in_any_second']} in any second: limit {'held' if r['held'] else 'NOT held'}")

    payload = {"sends": options.sends, "latency_s": options.latency, "rounds": options.rounds,
               "high_global_rate": {"per_second": HIGH_RATE[0], "burst": HIGH_RATE[1]},
               "python_speed_us": speed, "busy_cores_before": background,
               "medians": medians, "limiter_cost": cost, "runs": runs, "real_rates": real_rates}
    print(json.dumps(payload, indent=2))
    write_results("telegram", payload, python_speed_us=speed)
    if not all(r["held"] for r in real_rates.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
