"""Benchmark: the 08:00 burst — many digests due at once, drained by Celery workers — and
how many digests per second one PostgreSQL core can feed.

    python bench/bench_burst.py [--digests 20000] [--workers 2] [--threads 8] [--data-delay 0.03]

At the default send time every user's digest falls due in the same minute. This seeds
``--digests`` due daily email digests (``--items`` events each, as bench_latency.py
does), starts ``--workers`` worker processes as docs/deployment.md recommends
(``-Q alerts,alerts.send --pool threads -c T -O fair --without-gossip --without-mingle``,
Redis broker, ALERTS_PUBLIC_URL and ALERTS_SECRET_KEY set as in production), triggers ``alerts.build_digests`` — which enqueues one send task per due
digest — and times until the SMTP server (in a process of its own, answering DATA after
``--data-delay`` seconds like a real provider) has every message, and until every row is
``sent``. It reports:

- the time to drain and digests/s;
- CPU seconds per 1,000 digests of the workers, PostgreSQL (the whole server: the
  postmaster, its live processes and the backends that closed during the run), Redis
  and the SMTP server, and the cores the machine kept busy;
- PostgreSQL's CPU per digest, and from it the digests per second one PostgreSQL core
  can feed (1 / CPU per digest): how far the send path scales out by adding worker
  machines before the database is the limit;
- duplicates and missing messages at the server (by Message-ID).

On one small machine the workers, PostgreSQL, Redis and the SMTP server share the
cores, so the drain time says what this machine does; PostgreSQL's CPU per digest is
the figure that carries over. ``--digests 2000`` makes a quick run.

Needs PostgreSQL on this machine (ALERTS_BENCH_PG_ADMIN_URL, default
postgresql://postgres@127.0.0.1/postgres) and Redis (ALERTS_BENCH_BROKER_URL, default
redis://127.0.0.1:6379/13, flushed). Results: bench/results/burst-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (PRODUCTION_LINKS, SmtpServerProcess, busy_cores, count_sent, create_database, drop_database,  # noqa: E402
                           postmaster_pid, producer_client, python_speed_us, wait_for, worker_env, write_results)
from bench.bench_celery import seed, stop_workers, wait_ready  # noqa: E402
from bench.bench_latency import Meter, start_workers, summary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digests", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=3, help="events per digest")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker")
    parser.add_argument("--data-delay", type=float, default=0.03, help="seconds the server waits before answering DATA")
    parser.add_argument("--timeout", type=float, default=1800)
    options = parser.parse_args()
    n = options.digests

    import redis
    broker_url = os.environ.get("ALERTS_BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    server = SmtpServerProcess(data_delay=options.data_delay)
    url = create_database("alerts_bench_burst")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    client = producer_client(broker_url)
    meter = Meter(postmaster_pid(url), server, broker)
    workers = []
    try:
        print(f"[bench] seeding {n} due digests", file=sys.stderr)
        seed(url, n, options.items)
        background = busy_cores()
        speed = python_speed_us()
        env = worker_env(url, broker_url, server.port, **PRODUCTION_LINKS)
        workers = start_workers(options.workers, options.threads, env, log_dir)
        wait_ready(client, options.workers)
        pids = [w.pid for w in workers]
        print(f"[bench] draining with {options.workers} x {options.threads} threads", file=sys.stderr)
        before = meter.read(pids)
        started = time.perf_counter()
        client.send_task("alerts.build_digests")
        done = wait_for(lambda: server.ask("count") >= n, options.timeout, poll=0.2)
        spent = {key: value - before[key] for key, value in meter.read(pids).items()}
        all_sent = wait_for(lambda: count_sent(url, "user_alert_digests") >= n, 60, poll=0.2)
        time.sleep(1.0)  # let a late duplicate, if there were one, arrive
        ids = server.ask("ids")
    finally:
        stop_workers(workers)
        server.stop()
        client.close()
        rows_sent = count_sent(url, "user_alert_digests")
        drop_database(url)
        broker.flushdb()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept only when the run failed

    run = summary(n, done - started, spent, ids, rows_sent)
    postgres_ms = run["cpu_seconds_per_1000_digests"]["postgresql"]  # s per 1,000 = ms per digest
    payload = {
        "digests": n, "items_per_digest": options.items, "data_delay_s": options.data_delay,
        "workers": f"{options.workers} x {options.threads} threads",
        "python_speed_us": speed, "busy_cores_before": background,
        "seconds_to_drain": run["seconds"], "seconds_until_all_rows_sent": round(all_sent - started, 2),
        **{key: value for key, value in run.items() if key != "seconds"},
        "postgresql_cpu_ms_per_digest": postgres_ms,
        "digests_per_s_one_postgresql_core_feeds": round(1000 / postgres_ms) if postgres_ms > 0 else None,
    }
    cpu = run["cpu_seconds_per_1000_digests"]
    print(f"burst of {n} digests, {payload['workers']}: drained in {run['seconds']:.1f} s "
          f"({run['digests_per_s']:.1f} digests/s), every row sent after {payload['seconds_until_all_rows_sent']:.1f} s; "
          f"duplicates {run['duplicates']}, missing {run['missing']}")
    print(f"CPU s per 1,000 digests: workers {cpu['senders']:.2f}, PostgreSQL {cpu['postgresql']:.2f}, "
          f"Redis {cpu['redis']:.2f}, SMTP server {cpu['smtp_server']:.2f}; busy cores {run['machine_busy_cores']} "
          f"(before the run {background}); python_speed_us {speed}")
    print(f"PostgreSQL: {postgres_ms:.3f} ms of CPU per digest -> one core feeds "
          f"{payload['digests_per_s_one_postgresql_core_feeds']} digests/s")
    print(json.dumps(payload, indent=2))
    write_results("burst", payload, python_speed_us=speed)


if __name__ == "__main__":
    main()
