"""Benchmark: the same due digests through one Celery worker on Redis, then on RabbitMQ.

    python bench/bench_broker.py [--digests 2000] [--pool threads] [--concurrency 8] [--rounds 1]

For each broker in turn (a fresh PostgreSQL database seeded as in bench_celery.py, one
worker as docs/deployment.md recommends: ``--pool threads -c 8``, both queues): ``alerts.build_digests``
is triggered and the run is timed until the SMTP server (in a process of its own) holds
every message; duplicates are counted by Message-ID. The brokers alternate over
``--rounds`` so a drift in the machine's speed hits both. It answers "does the broker
matter for throughput?" for docs/deployment.md's "Choosing a broker".

Needs PostgreSQL (ALERTS_BENCH_PG_ADMIN_URL), Redis (ALERTS_BENCH_BROKER_URL, default
redis://127.0.0.1:6379/14, flushed) and RabbitMQ with rabbitmqctl on this machine
(ALERTS_BENCH_AMQP_URL, default amqp://guest:guest@127.0.0.1:5672; a vhost of its own per
run, deleted after).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (SmtpServerProcess, create_database, drop_database, producer_client,  # noqa: E402
                           worker_env, write_results)
from bench.bench_celery import celery_digests, seed, start_workers, stop_workers, wait_ready  # noqa: E402

REDIS_URL = os.environ.get("ALERTS_BENCH_BROKER_URL", "redis://127.0.0.1:6379/14")
AMQP_ROOT = os.environ.get("ALERTS_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def one_run(kind: str, options, server: SmtpServerProcess) -> dict:
    import redis
    vhost = None
    if kind == "redis":
        broker_url = REDIS_URL
        redis.Redis.from_url(broker_url).flushdb()
        extra = {}
    else:
        vhost = f"alerts-bench-{uuid.uuid4().hex[:8]}"
        rabbitmqctl("add_vhost", vhost)
        user = AMQP_ROOT.split("://", 1)[1].split(":", 1)[0]
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        broker_url = f"{AMQP_ROOT}/{vhost}"
        extra = {"ALERTS_RATELIMIT_REDIS_URL": REDIS_URL}
    url = create_database("alerts_bench_broker")
    client = producer_client(broker_url)
    workers = []
    try:
        seed(url, options.digests, 3)
        env = worker_env(url, broker_url, server.port, **extra)
        log_dir = Path(tempfile.mkdtemp(prefix=f"bench-broker-{kind}-"))
        workers = start_workers(1, options.pool, options.concurrency, env, log_dir, "alerts,alerts.send")
        wait_ready(client, 1)
        seconds = celery_digests(client, server, options.digests, options.timeout)["seconds"]
        time.sleep(1.0)  # a late duplicate, if there were one
        ids = server.ask("ids")
    finally:
        stop_workers(workers)
        client.close()
        drop_database(url)
        server.ask("reset")
        if vhost:
            rabbitmqctl("delete_vhost", vhost)
        else:
            redis.Redis.from_url(REDIS_URL).flushdb()
    return {"seconds": seconds, "per_s": options.digests / seconds, "duplicates": len(ids) - len(set(ids)),
            "messages": len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digests", type=int, default=2000)
    parser.add_argument("--pool", choices=["solo", "prefork", "threads"], default="threads")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    options = parser.parse_args()

    server = SmtpServerProcess()
    runs: dict[str, list[dict]] = {"redis": [], "amqp": []}
    try:
        for _ in range(options.rounds):
            for kind in runs:
                runs[kind].append(one_run(kind, options, server))
    finally:
        server.stop()
    report = {"digests": options.digests, "pool": options.pool, "concurrency": options.concurrency,
              "rounds": options.rounds}
    for kind, results in runs.items():
        report[kind] = {"digests_per_s": round(statistics.median(r["per_s"] for r in results), 1),
                        "each_per_s": [round(r["per_s"], 1) for r in results],
                        "duplicates": sum(r["duplicates"] for r in results),
                        "all_delivered": all(r["messages"] >= options.digests for r in results)}
    report["amqp_to_redis"] = round(report["amqp"]["digests_per_s"] / report["redis"]["digests_per_s"], 3)
    print(json.dumps(report))
    write_results("broker", report)


if __name__ == "__main__":
    main()
