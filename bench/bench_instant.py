"""Benchmark: the event-driven instant path (docs/deployment.md) — from ``alerts.ingest_event``
being published to the email at an SMTP server, with no beat running.

    python bench/bench_instant.py [--events 200] [--backlog 5000] [--pool threads] [--concurrency 8] [--interval 0.05]

One Celery worker as docs/deployment.md recommends for a single machine
(``-Q alerts,alerts.send --pool threads -c 8 -O fair --without-gossip --without-mingle``),
Redis, PostgreSQL, and an aiosmtpd server in this process (so publish and arrival are
timed on one clock). One user has an instant email preference; each event matches it.

1. idle: ``--events`` events published one at a time, each after the previous one's
   email arrived; latency = arrival - the moment ``send_task`` returned;
2. backlog: ``--backlog`` due digests are enqueued (``alerts.build_digests``: one
   ``alerts.send_digest`` each, on the send queue); as soon as the first digest has
   arrived, ``--events`` events are published every ``--interval`` seconds while the
   digests drain. Only events published while digests were still waiting count.

Prints p50 / p95 / p99 / max per scenario and whether the targets hold (p95 ≤ 1 s idle,
≤ 3 s under the backlog), plus how many digests were still queued when the last event
arrived. Needs PostgreSQL (ALERTS_BENCH_PG_ADMIN_URL) and Redis (ALERTS_BENCH_BROKER_URL,
default redis://127.0.0.1:6379/14, flushed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, create_database, drop_database, producer_client, worker_env, write_results  # noqa: E402
from bench.bench_celery import seed, stop_workers, wait_ready  # noqa: E402

TARGET_P95_SECONDS = {"idle": 1.0, "backlog": 3.0}
EVENT_TIMEOUT_SECONDS = 60
_TITLE = re.compile(rb"instant-bench-(\d+)")


class ArrivalServer:
    """An aiosmtpd server in this process that notes when each instant email arrived
    (by the event number in its subject) and counts the digests."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.arrived: dict[int, float] = {}
        self.digests = 0
        self._lock = threading.Lock()
        with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port
            self.port = probe.getsockname()[1]
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):
        now = time.perf_counter()
        match = _TITLE.search(envelope.content)
        with self._lock:
            if match:
                self.arrived.setdefault(int(match.group(1)), now)
            else:
                self.digests += 1
        return "250 OK"

    def stop(self) -> None:
        self.controller.stop()


def start_worker(env: dict, pool: str, concurrency: int, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / "worker.log", "wb")
    args = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--loglevel=WARNING",
            "-Q", "alerts,alerts.send", "--pool", pool, "-c", str(concurrency), "-O", "fair",
            "--without-gossip", "--without-mingle", "-n", f"instant-{os.getpid()}@%h"]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def add_reader(url: str) -> None:
    from alerts.core.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        user = conn.exec_driver_sql("INSERT INTO users (email) VALUES ('reader@example.com') RETURNING id").scalar()
        conn.exec_driver_sql("""INSERT INTO user_alert_prefs (user_id, alert_type, channel, delivery_kind)
                                VALUES (%s, 'price_spike', 'email', 'instant')""", (user,))
    engine.dispose()


def event(n: int) -> dict:
    return {"event_key": f"instant-bench-{n}", "alert_type": "price_spike", "region": "NL", "severity": 4,
            "title": f"TTF day-ahead +18% instant-bench-{n}", "summary": "Cold snap",
            "url": f"https://energyriskiq.com/e/{n}"}


def wait(predicate, timeout: float = EVENT_TIMEOUT_SECONDS, poll: float = 0.002) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise RuntimeError("timed out waiting for the SMTP server; see the worker log")
        time.sleep(poll)


def summary(latencies: list[float], target: float) -> dict:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1)], 3)

    p95 = pct(95)
    return {"events": len(ordered), "p50_s": pct(50), "p95_s": p95, "p99_s": pct(99),
            "max_s": round(ordered[-1], 3), "mean_s": round(statistics.fmean(ordered), 3),
            "target": f"p95 <= {target} s: {'met' if p95 <= target else 'NOT met'}"}


def idle(client, server: ArrivalServer, events: int, first: int) -> list[float]:
    latencies = []
    for n in range(first, first + events):
        client.send_task("alerts.ingest_event", args=[event(n)])
        published = time.perf_counter()
        wait(lambda: n in server.arrived)
        latencies.append(server.arrived[n] - published)
    return latencies


def under_backlog(client, broker, server: ArrivalServer, events: int, first: int, backlog: int,
                  interval: float) -> dict:
    client.send_task("alerts.build_digests")
    wait(lambda: server.digests > 0, timeout=120)  # the backlog is queued and draining
    published: dict[int, tuple[float, int]] = {}  # event -> (when, digests still to come)
    for n in range(first, first + events):
        client.send_task("alerts.ingest_event", args=[event(n)])
        published[n] = (time.perf_counter(), backlog - server.digests)
        time.sleep(interval)
    wait(lambda: all(n in server.arrived for n in published), timeout=300)
    left_at_end = backlog - server.digests
    counted = [server.arrived[n] - at for n, (at, waiting) in published.items() if waiting > 0]
    return {"latencies": counted, "published": len(published), "digests_left_when_last_event_arrived": left_at_end,
            "send_queue_left": broker.llen("alerts.send")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200, help="events per scenario")
    parser.add_argument("--backlog", type=int, default=5000, help="due digests draining in the second scenario")
    parser.add_argument("--pool", default="threads", choices=["threads", "prefork", "solo"])
    parser.add_argument("--concurrency", type=int, default=8, help="threads (or processes) of the one worker")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between events under the backlog")
    options = parser.parse_args()

    import redis
    broker_url = os.environ.get("ALERTS_BENCH_BROKER_URL", "redis://127.0.0.1:6379/14")
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    server = ArrivalServer()
    url = create_database("alerts_bench_instant")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-instant-"))
    client = producer_client(broker_url)
    env = worker_env(url, broker_url, server.port)
    worker = None
    try:
        seed(url, options.backlog, 3)
        add_reader(url)
        worker = start_worker(env, options.pool, options.concurrency, log_dir)
        wait_ready(client, 1)
        idle(client, server, 10, first=10 ** 6)  # warm up: connections, imports
        print("[bench] idle", file=sys.stderr)
        idle_latencies = idle(client, server, options.events, first=0)
        print(f"[bench] under a backlog of {options.backlog} digests", file=sys.stderr)
        backlog = under_backlog(client, broker, server, options.events, options.events, options.backlog,
                                options.interval)
    finally:
        if worker is not None:
            stop_workers([worker])
        server.stop()
        client.close()
        drop_database(url)
        broker.flushdb()
    shutil.rmtree(log_dir, ignore_errors=True)
    payload = {
        "worker": f"1 worker, -Q alerts,alerts.send --pool {options.pool} -c {options.concurrency}",
        "idle": summary(idle_latencies, TARGET_P95_SECONDS["idle"]),
        "backlog": {"digests": options.backlog, "events_published": backlog["published"],
                    "digests_left_when_last_event_arrived": backlog["digests_left_when_last_event_arrived"],
                    **summary(backlog["latencies"], TARGET_P95_SECONDS["backlog"])},
    }
    print(json.dumps(payload, indent=2))
    write_results("instant", payload)


if __name__ == "__main__":
    main()
