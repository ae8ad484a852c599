"""Benchmark: due digests through Celery workers to an SMTP server with a real provider's
latency, next to a bare pool of smtplib connections to the same server.

    python bench/bench_latency.py [--digests 3000] [--workers 2] [--threads 4 8] [--data-delay 0.03] [--repeat 3]

A real SMTP provider answers in 20-100 ms, so what decides a sender's throughput is how
well it overlaps those waits and how much CPU it spends per message, not one database
round trip more or less. For each ``--threads`` T, in one run against one aiosmtpd
server (in a process of its own) that answers DATA after ``--data-delay`` seconds:

1. reference: ``workers x T`` smtplib connections, each in a thread, sending the exact
   bytes a worker sends for the first digest, N times between them — before the Celery
   run and again after it (the ratio uses the mean: the machine's speed drifts);
2. Celery: ``alerts.build_digests`` enqueues one ``alerts.send_digest`` per due digest
   and ``--workers`` worker processes started as replit.md recommends
   (``-Q alerts,alerts.send --pool threads -c T -O fair --without-gossip --without-mingle``,
   Redis broker, PostgreSQL) send them; timed from the trigger until the server has N
   messages; duplicates and missing messages counted at the server by Message-ID;
3. CPU seconds per 1,000 digests of the workers, the PostgreSQL server, Redis and the
   SMTP server over the Celery run (from /proc and Redis INFO), the cores the whole
   machine kept busy and the share the hypervisor stole; and, just before the run, how
   fast the machine runs Python (``python_speed_us``): the ratio depends on it, because
   the reference waits on the server's latency while the workers spend CPU.

Each setup runs ``--repeat`` times (fresh workers, the rows re-queued); the median ratio
counts, because on a shared 2-core machine one run can be 10 % off the next.

Needs PostgreSQL (ALERTS_BENCH_PG_ADMIN_URL, default postgresql://postgres@127.0.0.1/postgres)
and Redis (ALERTS_BENCH_BROKER_URL, default redis://127.0.0.1:6379/13, flushed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (ROOT, SmtpServerProcess, bare_smtplib_pool, count_sent, create_database,  # noqa: E402
                           digest_sample_message, drop_database, machine_cpu, postgres_cpu, process_tree_cpu,
                           producer_client, python_speed_us, redis_cpu, wait_for, worker_env)
from bench.bench_celery import seed, stop_workers, wait_ready  # noqa: E402

TARGETS = {4: 0.85, 8: 0.6}  # threads per worker -> the least ratio to the bare pool


def start_workers(count: int, threads: int, env: dict, log_dir: Path) -> list[subprocess.Popen]:
    """Worker processes as replit.md's "Running with Celery" starts them."""
    workers = []
    for n in range(count):
        log = open(log_dir / f"worker-{threads}-{n}.log", "wb")
        args = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--loglevel=WARNING",
                "-Q", "alerts,alerts.send", "--pool", "threads", "-c", str(threads), "-O", "fair",
                "--without-gossip", "--without-mingle", "-n", f"latency{n}-{os.getpid()}@%h"]
        workers.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True))
    return workers


def requeue_digests(url: str) -> None:
    from alerts.core.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("""UPDATE user_alert_digests SET status = 'queued', attempts = 0, sent_at = NULL,
                                       last_error = NULL, claimed_at = NULL, enqueued_at = NULL,
                                       next_retry_at = window_end""")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE user_alert_digests")
    engine.dispose()


def cpu_reading(workers: list[subprocess.Popen], server: SmtpServerProcess, broker) -> dict[str, float]:
    """CPU seconds so far of each part of the run, and of the whole machine."""
    busy, stolen = machine_cpu()
    return {"workers": sum(process_tree_cpu(w.pid) for w in workers), "postgresql": postgres_cpu(),
            "redis": redis_cpu(broker), "smtp_server": process_tree_cpu(server.pid),
            "machine_busy": busy, "machine_stolen": stolen}


def one_run(url: str, server: SmtpServerProcess, broker, client, options, threads: int,
            message: tuple[str, str, bytes], env: dict, log_dir: Path) -> dict:
    n, connections = options.digests, options.workers * threads
    server.ask("reset")
    bare_before = bare_smtplib_pool(server.port, *message, n, connections)
    server.ask("reset")
    requeue_digests(url)
    speed = python_speed_us()  # the machine drifts: read it next to the run it explains
    workers = start_workers(options.workers, threads, env, log_dir)
    try:
        wait_ready(client, options.workers)
        before = cpu_reading(workers, server, broker)
        started = time.perf_counter()
        client.send_task("alerts.build_digests")
        done = wait_for(lambda: server.ask("count") >= n, options.timeout)
        spent = {key: value - before[key] for key, value in cpu_reading(workers, server, broker).items()}
        time.sleep(1.0)  # let a late duplicate, if there were one, arrive
        ids = server.ask("ids")
    finally:
        stop_workers(workers)
    rows_sent = count_sent(url, "user_alert_digests")
    server.ask("reset")
    bare_after = bare_smtplib_pool(server.port, *message, n, connections)
    seconds = done - started
    celery_rate = n / seconds
    bare_rates = (n / bare_before, n / bare_after)
    bare_rate = sum(bare_rates) / 2
    per_thousand = 1000 / n
    cpu = {key: round(spent[key] * per_thousand, 2) for key in ("workers", "postgresql", "redis", "smtp_server")}
    return {
        "bare_pool_per_s": round(bare_rate, 1),
        "bare_pool_before_after_per_s": [round(rate, 1) for rate in bare_rates],
        "celery_digests_per_s": round(celery_rate, 1),
        "ratio": round(celery_rate / bare_rate, 3),
        "python_speed_us": speed,
        "cpu_seconds_per_1000_digests": cpu,
        # Cores the whole machine kept busy during the Celery run, and the share of its
        # time the hypervisor gave to someone else: at 2 busy cores the run was CPU-bound.
        "machine_busy_cores": round(spent["machine_busy"] / seconds, 2),
        "machine_steal_percent": round(100 * spent["machine_stolen"] / (seconds * os.cpu_count()), 1),
        "messages_at_server": len(ids), "duplicates": len(ids) - len(set(ids)),
        "missing": n - len(set(ids)), "rows_sent": rows_sent,
    }


def one_setup(url, server, broker, client, options, threads, message, env, log_dir) -> dict:
    runs = [one_run(url, server, broker, client, options, threads, message, env, log_dir)
            for _ in range(options.repeat)]
    middle = sorted(runs, key=lambda run: run["ratio"])[len(runs) // 2]
    exact = all(run["duplicates"] == run["missing"] == 0 for run in runs)
    target = TARGETS.get(threads)
    return {
        "setup": f"{options.workers} processes x {threads} threads",
        "bare_pool_connections": options.workers * threads,
        "median_ratio": middle["ratio"],
        "ratios": [run["ratio"] for run in runs],
        "median_run": middle,
        "duplicates": sum(run["duplicates"] for run in runs), "missing": sum(run["missing"] for run in runs),
        "target": (f"median ratio >= {target} with 0 duplicates and 0 missing: "
                   f"{'met' if middle['ratio'] >= target and exact else 'NOT met'}" if target else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digests", type=int, default=3000)
    parser.add_argument("--items", type=int, default=3, help="events per digest")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 8], help="threads per worker, one run each")
    parser.add_argument("--data-delay", type=float, default=0.03, help="seconds the server waits before answering DATA")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setup; the median counts")
    parser.add_argument("--timeout", type=float, default=600)
    options = parser.parse_args()

    import redis
    broker_url = os.environ.get("ALERTS_BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    server = SmtpServerProcess(data_delay=options.data_delay)
    url = create_database("alerts_bench_latency")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    client = producer_client(broker_url)
    env = worker_env(url, broker_url, server.port)
    runs = []
    try:
        seed(url, options.digests, options.items)
        message = digest_sample_message(url, server.port)
        for threads in options.threads:
            print(f"[bench] {options.workers} x {threads} threads", file=sys.stderr)
            runs.append(one_setup(url, server, broker, client, options, threads, message, env, log_dir))
    finally:
        server.stop()
        client.close()
        drop_database(url)
        broker.flushdb()
    shutil.rmtree(log_dir, ignore_errors=True)
    print(json.dumps({"digests": options.digests, "items_per_digest": options.items,
                      "data_delay_s": options.data_delay, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
