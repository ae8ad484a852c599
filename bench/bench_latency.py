"""Benchmark: due digests sent by Celery workers and by the lean reference — the same work
written by hand, without Celery (bench/lean_sender.py) — to an SMTP server with a real
provider's latency.

    python bench/bench_latency.py [--digests 3000] [--workers 2] [--threads 4 8] [--data-delay 0.03] [--repeat 3]

For each ``--threads`` T, ``--repeat`` times, against one aiosmtpd server (in a process
of its own) that answers DATA after ``--data-delay`` seconds, on the same due digests
(re-queued between the sides):

1. lean: ``--workers`` processes × T threads of bench/lean_sender.py, each thread with
   its own autocommit database connection and SMTP connection — claim, load, render,
   MIME, send, record: three statements a digest; timed from the go until the server
   has N messages;
2. Celery: ``alerts.build_digests`` enqueues one ``alerts.send_digest`` per due digest
   and ``--workers`` worker processes started as docs/deployment.md recommends
   (``-Q alerts,alerts.send --pool threads -c T -O fair --without-gossip --without-mingle``,
   Redis broker, PostgreSQL; ALERTS_PUBLIC_URL and ALERTS_SECRET_KEY set as in production,
   so every email carries its signed links and one-click headers, as the lean sender's
   do) send them; timed from the trigger until the server has N messages (Phase D's pass
   and the enqueueing included);
3. for context, the bare pool: ``workers × T`` smtplib connections sending the exact
   bytes of the first digest N times between them — no database, no rendering, no MIME.

Lean and Celery alternate which goes first from one repeat to the next. For both:
digests/s; CPU seconds per 1,000 digests of the senders (the lean processes, the
workers), of PostgreSQL (the whole server: the postmaster, its live processes and the
backends that closed during the run, from /proc), of Redis and of the SMTP server; the
cores the machine kept busy and the share the hypervisor stole; duplicates and missing
messages at the server (by Message-ID); and the ratios Celery/lean of throughput, of
sender CPU per digest and of PostgreSQL CPU per digest, against the targets. Each run
reads ``python_speed_us`` first (how fast the machine runs Python that minute), and the
machine's busy cores before anything starts (another process at work skews every figure).

Needs PostgreSQL on this machine (ALERTS_BENCH_PG_ADMIN_URL, default
postgresql://postgres@127.0.0.1/postgres) and Redis (ALERTS_BENCH_BROKER_URL, default
redis://127.0.0.1:6379/13, flushed). Results: bench/results/latency-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (PRODUCTION_LINKS, ROOT, SmtpServerProcess, bare_smtplib_pool, busy_cores,  # noqa: E402
                           count_sent, create_database, digest_sample_message, drop_database, libpq_url,
                           machine_cpu, postgres_cpu, postmaster_pid, process_tree_cpu, producer_client,
                           python_speed_us, redis_cpu, wait_for, worker_env, write_results)
from bench.bench_celery import seed, stop_workers, wait_ready  # noqa: E402
from bench.lean_sender import LeanSenders  # noqa: E402

# Celery against the lean reference, at each thread count measured.
THROUGHPUT_AT_LEAST = {4: 0.85, 8: 0.85}  # in at least two of three runs
SENDER_CPU_AT_MOST = 1.25  # worker CPU per digest over the lean processes', median of the runs
POSTGRES_CPU_AT_MOST = 1.1  # PostgreSQL CPU per digest, Celery over lean, median of the runs


def start_workers(count: int, threads: int, env: dict, log_dir: Path) -> list[subprocess.Popen]:
    """Worker processes as docs/deployment.md starts one worker for both queues."""
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
    """Every digest due again, as if never sent."""
    from alerts.core.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("""UPDATE user_alert_digests SET status = 'queued', attempts = 0, sent_at = NULL,
                                       last_error = NULL, claimed_at = NULL, enqueued_at = NULL,
                                       next_retry_at = window_end""")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE user_alert_digests")
    engine.dispose()


class Meter:
    """CPU seconds of each part of a run and of the whole machine, between two readings."""

    def __init__(self, postmaster: int | None, server: SmtpServerProcess, broker=None):
        self.postmaster, self.server, self.broker = postmaster, server, broker

    def read(self, senders: list[int]) -> dict[str, float]:
        busy, stolen = machine_cpu()
        return {"senders": sum(process_tree_cpu(pid) for pid in senders), "postgresql": postgres_cpu(self.postmaster),
                "redis": redis_cpu(self.broker) if self.broker is not None else 0.0,
                "smtp_server": process_tree_cpu(self.server.pid), "machine_busy": busy, "machine_stolen": stolen}


def summary(n: int, seconds: float, spent: dict[str, float], ids: list[str], rows_sent: int) -> dict:
    """One side's figures: digests/s, CPU per 1,000 digests, what reached the server."""
    per_thousand = 1000 / n
    return {
        "digests_per_s": round(n / seconds, 1),
        "seconds": round(seconds, 2),
        "cpu_seconds_per_1000_digests": {key: round(spent[key] * per_thousand, 3)
                                         for key in ("senders", "postgresql", "redis", "smtp_server")},
        # Cores the whole machine kept busy, and the share of its time the hypervisor
        # gave to someone else: at as many busy cores as it has, the run was CPU-bound.
        "machine_busy_cores": round(spent["machine_busy"] / seconds, 2),
        "machine_steal_percent": round(100 * spent["machine_stolen"] / (seconds * os.cpu_count()), 1),
        "messages_at_server": len(ids), "duplicates": len(ids) - len(set(ids)), "missing": n - len(set(ids)),
        "rows_sent": rows_sent,
    }


def run_celery(url: str, server: SmtpServerProcess, meter: Meter, client, options, threads: int, env: dict,
               log_dir: Path) -> dict:
    n = options.digests
    workers = start_workers(options.workers, threads, env, log_dir)
    try:
        wait_ready(client, options.workers)
        pids = [w.pid for w in workers]
        before = meter.read(pids)
        started = time.perf_counter()
        client.send_task("alerts.build_digests")
        done = wait_for(lambda: server.ask("count") >= n, options.timeout)
        spent = {key: value - before[key] for key, value in meter.read(pids).items()}
        time.sleep(1.0)  # let a late duplicate, if there were one, arrive
        ids = server.ask("ids")
    finally:
        stop_workers(workers)
    return summary(n, done - started, spent, ids, count_sent(url, "user_alert_digests"))


def run_lean(url: str, server: SmtpServerProcess, meter: Meter, options, threads: int) -> dict:
    n = options.digests
    senders = LeanSenders(libpq_url(url), server.port, options.workers, threads)
    try:
        pids = [p.pid for p in senders.processes]
        before = meter.read(pids)
        started = time.perf_counter()
        senders.go()
        # Until the server has every message — or the senders found nothing more due.
        done = wait_for(lambda: server.ask("count") >= n or senders.exited(), options.timeout)
        spent = {key: value - before[key] for key, value in meter.read(pids).items()}
        report = senders.finish()
    finally:
        senders.kill()
    # The processes measure their own CPU from the go to their end (they have exited by now).
    spent["senders"] = report["cpu_s"]
    time.sleep(1.0)
    ids = server.ask("ids")
    return summary(n, done - started, spent, ids, count_sent(url, "user_alert_digests"))


def ratios(celery: dict, lean: dict) -> dict:
    def per_digest(side: dict, key: str) -> float:
        return side["cpu_seconds_per_1000_digests"][key]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b and not math.isnan(a) and not math.isnan(b) else None

    return {"throughput": ratio(celery["digests_per_s"], lean["digests_per_s"]),
            "sender_cpu_per_digest": ratio(per_digest(celery, "senders"), per_digest(lean, "senders")),
            "postgresql_cpu_per_digest": ratio(per_digest(celery, "postgresql"), per_digest(lean, "postgresql"))}


def one_run(url: str, server: SmtpServerProcess, meter: Meter, client, options, threads: int,
            message: tuple[str, str, bytes], env: dict, log_dir: Path, lean_first: bool) -> dict:
    n, connections = options.digests, options.workers * threads
    background = busy_cores()
    speed = python_speed_us()  # the machine drifts: read it next to the run it explains
    sides = {}
    for side in (("lean", "celery") if lean_first else ("celery", "lean")):
        server.ask("reset")
        requeue_digests(url)
        print(f"[bench]   {side}", file=sys.stderr)
        sides[side] = (run_lean(url, server, meter, options, threads) if side == "lean"
                       else run_celery(url, server, meter, client, options, threads, env, log_dir))
    server.ask("reset")
    bare_seconds = bare_smtplib_pool(server.port, *message, n, connections)
    return {"python_speed_us": speed, "busy_cores_before": background, "order": list(sides),
            "lean": sides["lean"], "celery": sides["celery"],
            "bare_pool": {"connections": connections, "messages_per_s": round(n / bare_seconds, 1)},
            "celery_to_lean": ratios(sides["celery"], sides["lean"])}


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def print_run(setup: str, number: int, run: dict) -> None:
    print(f"{setup}, run {number}: python_speed_us {run['python_speed_us']}, "
          f"busy cores before {run['busy_cores_before']}")
    for side in ("lean", "celery"):
        s = run[side]
        cpu = s["cpu_seconds_per_1000_digests"]
        senders = "workers" if side == "celery" else "senders"
        redis = f", Redis {cpu['redis']:.2f}" if side == "celery" else ""
        print(f"  {side:<6} {s['digests_per_s']:>7.1f} digests/s  CPU s per 1,000 digests: "
              f"{senders} {cpu['senders']:.2f}, PostgreSQL {cpu['postgresql']:.2f}{redis}  "
              f"busy cores {s['machine_busy_cores']}  duplicates {s['duplicates']}, missing {s['missing']}")
    bare = run["bare_pool"]
    print(f"  bare pool {bare['messages_per_s']:.1f} messages/s ({bare['connections']} smtplib connections: "
          f"no database, no rendering, no MIME)")
    r = run["celery_to_lean"]
    print(f"  celery/lean: throughput {r['throughput']}, worker CPU per digest {r['sender_cpu_per_digest']}, "
          f"PostgreSQL CPU per digest {r['postgresql_cpu_per_digest']}")


def judge(threads: int, runs: list[dict]) -> dict:
    """The targets over a setup's runs: throughput in at least two of three (of every
    three) runs, CPU ratios at their median, nothing duplicated or missing."""
    needed = max(1, math.ceil(2 * len(runs) / 3))
    floor = THROUGHPUT_AT_LEAST.get(threads)
    throughput = [run["celery_to_lean"]["throughput"] or 0 for run in runs]
    sender = statistics.median(run["celery_to_lean"]["sender_cpu_per_digest"] or math.inf for run in runs)
    postgres = statistics.median(run["celery_to_lean"]["postgresql_cpu_per_digest"] or math.inf for run in runs)
    exact = all(run[side]["duplicates"] == run[side]["missing"] == 0 for run in runs for side in ("lean", "celery"))
    targets = {
        "throughput": None if floor is None else {
            "target": f">= {floor} in at least {needed} of {len(runs)} runs",
            "runs_meeting": sum(t >= floor for t in throughput), "pass": sum(t >= floor for t in throughput) >= needed},
        "sender_cpu_per_digest": {"target": f"<= {SENDER_CPU_AT_MOST} (median)", "median": sender,
                                  "pass": sender <= SENDER_CPU_AT_MOST},
        "postgresql_cpu_per_digest": {"target": f"<= {POSTGRES_CPU_AT_MOST} (median)", "median": postgres,
                                      "pass": postgres <= POSTGRES_CPU_AT_MOST},
        "exactly_once": {"target": "0 duplicates, 0 missing", "pass": exact},
    }
    return {name: target for name, target in targets.items() if target is not None}


def print_targets(setup: str, targets: dict, runs: list[dict]) -> None:
    throughput = " ".join(str(run["celery_to_lean"]["throughput"]) for run in runs)
    lines = []
    if "throughput" in targets:
        t = targets["throughput"]
        lines.append(f"throughput {t['target']}: {t['runs_meeting']} ({throughput}) {verdict(t['pass'])}")
    for name, label in (("sender_cpu_per_digest", "worker CPU per digest"),
                        ("postgresql_cpu_per_digest", "PostgreSQL CPU per digest")):
        t = targets[name]
        lines.append(f"{label} {t['target']}: {t['median']} {verdict(t['pass'])}")
    lines.append(f"exactly once: {verdict(targets['exactly_once']['pass'])}")
    print(f"{setup} celery/lean targets: " + "; ".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digests", type=int, default=3000)
    parser.add_argument("--items", type=int, default=3, help="events per digest")
    parser.add_argument("--workers", type=int, default=2, help="processes, Celery's and the lean reference's")
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 8], help="threads per process, one setup each")
    parser.add_argument("--data-delay", type=float, default=0.03, help="seconds the server waits before answering DATA")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setup")
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
    env = worker_env(url, broker_url, server.port, **PRODUCTION_LINKS)
    meter = Meter(postmaster_pid(url), server, broker)
    setups = []
    try:
        seed(url, options.digests, options.items)
        message = digest_sample_message(url, server.port, **PRODUCTION_LINKS)
        for threads in options.threads:
            setup = f"{options.workers} x {threads}"
            runs = []
            for number in range(options.repeat):
                print(f"[bench] {setup}, run {number + 1} of {options.repeat}", file=sys.stderr)
                runs.append(one_run(url, server, meter, client, options, threads, message, env, log_dir,
                                    lean_first=number % 2 == 0))
                print_run(setup, number + 1, runs[-1])
            targets = judge(threads, runs)
            print_targets(setup, targets, runs)
            setups.append({"setup": f"{setup} threads", "processes": options.workers, "threads": threads,
                           "targets": targets, "runs": runs})
    finally:
        server.stop()
        client.close()
        drop_database(url)
        broker.flushdb()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept only when the run failed
    payload = {"digests": options.digests, "items_per_digest": options.items, "data_delay_s": options.data_delay,
               "setups": setups}
    print(json.dumps(payload, indent=2))
    write_results("latency", payload, python_speed_us=[run["python_speed_us"] for s in setups for run in s["runs"]])


if __name__ == "__main__":
    main()
