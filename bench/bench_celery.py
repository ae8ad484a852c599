"""Benchmark: due digests sent through Celery workers, next to a bare smtplib loop.

    python bench/bench_celery.py [--digests 10000] [--workers 2] [--pool threads|solo|prefork] [--concurrency 4]

In one run, against one aiosmtpd server (tests/support/fakes/smtp_server.py via bench/_common.py,
in a process of its own so it never shares the GIL with a sender):
1. reference: one smtplib connection sending the same rendered digest (the exact bytes a
   worker sends for it) N times — before the Celery run and again after it, the ratio
   taken to the mean of the two (the machine's speed drifts during a run); and, for
   context, one plain loop rendering each digest and sending it (no claims, no Celery);
2. Celery: ``alerts.build_digests`` enqueues one ``alerts.send_digest`` per due digest and
   ``--workers`` worker processes (Redis broker, PostgreSQL; ``--pool``, ``--concurrency``
   threads — or children — per worker, ``-O fair --without-gossip --without-mingle
   --without-heartbeat``; the app keeps acks_late and prefetch multiplier 1) send them;
   timed from the trigger until the server has N messages, so Phase D and the enqueueing
   are included; duplicates counted at the server by Message-ID;
3. the Celery no-op task rate of the same workers, for reference.

The ratio reported is Celery digests/s over the bare loop's messages/s (mean of before
and after).

Needs PostgreSQL (ALERTS_BENCH_PG_ADMIN_URL, default postgresql://postgres@127.0.0.1/postgres)
and Redis (ALERTS_BENCH_BROKER_URL, default redis://127.0.0.1:6379/13, flushed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import shared_task  # noqa: E402

from alerts.sending.outbox import DIGESTS  # noqa: E402
from bench._common import (ROOT, SmtpServerProcess, bare_smtplib, count_sent, create_database, drop_database,  # noqa: E402
                           producer_client, python_speed_us, sample_message, smtp_settings, wait_for,
                           worker_env, write_results)

NOOP_QUEUE = "bench.noop"
TARGET_RATIO = 0.5


@shared_task(name="bench.noop", ignore_result=True, acks_late=True)
def noop() -> None:
    """Loaded into the workers with ``--include bench.bench_celery``."""


# --- data ------------------------------------------------------------------------------------

def seed(url: str, digests: int, items: int) -> None:
    """``digests`` users, each with one due daily digest of ``items`` events (set-based)."""
    from alerts.core.db import make_engine

    window_end = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    window_start = window_end - timedelta(days=1)
    engine = make_engine(url)
    with engine.begin() as conn:
        sql = conn.exec_driver_sql
        sql("INSERT INTO users (email) SELECT 'user' || n || '@example.com' FROM generate_series(1, %s) n",
            (digests,))
        sql("""INSERT INTO alert_events (event_key, alert_type, region, severity, title, summary, url, status,
                                         created_at)
               SELECT 'bench-' || n, 'pipeline_outage', 'NL', 1 + n %% 5, 'Event ' || n || ': flow cut at Emden',
                      'Flow reduced by 30%% after a compressor trip', 'https://energyriskiq.com/e/' || n,
                      'fanned_out', %s + n * interval '1 minute'
               FROM generate_series(1, %s) n""", (window_start, items))
        sql("""INSERT INTO user_alert_deliveries (user_id, alert_event_id, channel, delivery_kind, status, last_error)
               SELECT u.id, e.id, 'email', 'digest', 'skipped', 'batched_into_digest'
               FROM users u CROSS JOIN alert_events e""")
        sql("""INSERT INTO user_alert_digests (user_id, channel, period, window_start, window_end, digest_key,
                                               status, next_retry_at)
               SELECT id, 'email', 'daily', %s, %s, 'bench:' || id, 'queued', %s FROM users""",
            (window_start, window_end, window_end))
        sql("""INSERT INTO user_alert_digest_items (digest_id, delivery_id)
               SELECT g.id, d.id FROM user_alert_digests g JOIN user_alert_deliveries d ON d.user_id = g.user_id""")
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()


# --- the runs --------------------------------------------------------------------------------------

def render_and_send(url: str, port: int, n: int) -> float:
    """The same digests rendered and sent by one plain loop: no claims, no Celery — the
    floor for any sender that renders each digest in Python."""
    from alerts.channels.email import build_mime, envelope_sender
    from alerts.channels.registry import build_channels
    from alerts.core.db import make_engine

    settings = smtp_settings(url, port)
    sender = envelope_sender(settings.email_from)
    channels = build_channels(settings)
    engine = make_engine(url)
    with engine.connect() as conn:
        ids = conn.exec_driver_sql("SELECT id FROM user_alert_digests ORDER BY id LIMIT %s", (n,)).scalars().all()
    started = time.perf_counter()
    with engine.connect() as conn, smtplib.SMTP("127.0.0.1", port) as smtp:
        for first in range(0, len(ids), 500):
            for job in DIGESTS.load(conn, [(i, 1) for i in ids[first:first + 500]], settings, channels):
                smtp.sendmail(sender, [job.recipient], build_mime(job.message, settings.email_from, job.recipient))
    seconds = time.perf_counter() - started
    engine.dispose()
    return seconds


def start_workers(count: int, pool: str, concurrency: int, env: dict, log_dir: Path,
                  queues: str) -> list[subprocess.Popen]:
    workers = []
    for n in range(count):
        log = open(log_dir / f"worker-{n}.log", "wb")
        args = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--loglevel=WARNING",
                "-n", f"bench{n}-{os.getpid()}@%h", "-Q", queues, f"--pool={pool}", f"--concurrency={concurrency}", "-O", "fair",
                "--without-gossip", "--without-mingle", "--without-heartbeat", "--include", "bench.bench_celery"]
        workers.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True))
    return workers


def wait_ready(client, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = client.control.ping(timeout=0.5) or []
        if len(replies) >= count:
            return
    raise RuntimeError("workers did not start; see the worker logs")


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for process in workers:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in workers:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def celery_digests(client, server: SmtpServerProcess, n: int, timeout: float) -> dict:
    started = time.perf_counter()
    client.send_task("alerts.build_digests")
    done = wait_for(lambda: server.ask("count") >= n, timeout)
    return {"seconds": done - started}


def celery_noop(client, broker, n: int, timeout: float) -> dict:
    """Publish n no-op tasks while the workers are paused on another queue, then time
    how fast they drain."""
    client.control.cancel_consumer(NOOP_QUEUE, reply=True)
    with client.producer_or_acquire() as producer:
        for _ in range(n):
            client.send_task("bench.noop", queue=NOOP_QUEUE, producer=producer)
    started = time.perf_counter()
    client.control.add_consumer(NOOP_QUEUE, reply=True)
    done = wait_for(lambda: broker.llen(NOOP_QUEUE) == 0 and broker.hlen("unacked") == 0, timeout, poll=0.01)
    return {"seconds": done - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digests", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=3, help="events per digest")
    parser.add_argument("--workers", type=int, default=2)
    # threads: the pool docs/deployment.md recommends for the send queue. A send task mostly waits
    # (Redis, PostgreSQL, the SMTP server), and threads overlap those waits inside one
    # process; each thread keeps its own SMTP connection.
    parser.add_argument("--pool", choices=["solo", "prefork", "threads"], default="threads")
    parser.add_argument("--concurrency", type=int, default=4, help="threads or child processes per worker")
    parser.add_argument("--noop", type=int, default=10_000, help="no-op tasks for the reference rate")
    parser.add_argument("--timeout", type=float, default=600)
    options = parser.parse_args()

    import redis
    broker_url = os.environ.get("ALERTS_BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    n = options.digests
    server = SmtpServerProcess()
    url = create_database("alerts_bench_celery")
    workers: list[subprocess.Popen] = []
    log_dir = Path(tempfile.mkdtemp(prefix="bench-celery-"))
    client = producer_client(broker_url)
    speed = python_speed_us()  # the ratio moves with it from one day to the next
    try:
        seed(url, n, options.items)
        sender, recipient, data = sample_message(url, server.port, DIGESTS)
        bare_seconds = bare_smtplib(server.port, sender, recipient, data, n)
        server.ask("reset")
        render_seconds = render_and_send(url, server.port, n)
        server.ask("reset")

        env = worker_env(url, broker_url, server.port)
        workers = start_workers(options.workers, options.pool, options.concurrency, env, log_dir, f"alerts,alerts.send,{NOOP_QUEUE}")
        wait_ready(client, options.workers)
        digests = celery_digests(client, server, n, options.timeout)
        time.sleep(1.0)  # let a late duplicate, if there were one, arrive
        ids = server.ask("ids")
        noop_run = celery_noop(client, broker, options.noop, options.timeout)
        stop_workers(workers)
        server.ask("reset")
        # The reference again, after: on a shared machine the speed of everything drifts
        # during a run, so the ratio is taken to the mean of the loop before and after.
        bare_after_seconds = bare_smtplib(server.port, sender, recipient, data, n)
    finally:
        stop_workers(workers)
        server.stop()
        client.close()
        db_sent = count_sent(url, "user_alert_digests")
        drop_database(url)
        broker.flushdb()

    bare_rates = (n / bare_seconds, n / bare_after_seconds)
    bare_rate, celery_rate = sum(bare_rates) / 2, n / digests["seconds"]
    report = {
        "digests": n, "items_per_digest": options.items, "workers": options.workers, "pool": options.pool,
        "python_speed_us": speed,
        "concurrency": options.concurrency if options.pool != "solo" else 1,
        "bare_smtplib_per_s": round(bare_rate, 1),
        "bare_smtplib_before_after_per_s": [round(rate, 1) for rate in bare_rates],
        "celery_digests_per_s": round(celery_rate, 1),
        "ratio": round(celery_rate / bare_rate, 3),
        "render_and_send_loop_per_s": round(n / render_seconds, 1),
        "ratio_to_render_loop": round(celery_rate / (n / render_seconds), 3),
        "messages_at_server": len(ids), "distinct_message_ids": len(set(ids)),
        "duplicates": len(ids) - len(set(ids)), "rows_sent": db_sent,
        "celery_noop_tasks_per_s": round(options.noop / noop_run["seconds"], 1),
        "target": f"ratio >= {TARGET_RATIO} with 0 duplicates: "
                  f"{'met' if celery_rate / bare_rate >= TARGET_RATIO and len(ids) == len(set(ids)) == n else 'NOT met'}",
    }
    shutil.rmtree(log_dir, ignore_errors=True)  # kept only when the run failed
    print(json.dumps(report, indent=2))
    write_results("celery", report, python_speed_us=speed)


if __name__ == "__main__":
    main()
