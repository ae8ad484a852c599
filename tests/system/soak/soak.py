"""Fault-injection soak of the whole production shape: nothing lost, nothing sent twice.

    python tests/system/soak/soak.py --duration 60                 # the short run (CI runs ~40 s)
    python tests/system/soak/soak.py --duration 1800 --users 500 --rate 2 --seed 7   # the long run

On this machine it starts a throwaway PostgreSQL database (created on 127.0.0.1, dropped
at the end), a private Redis (``redis-server --save ''`` on a free port, so restarting
it disturbs nobody), two ``celery -A celery_app worker`` processes, ``celery beat`` with
short intervals, and on loopback the test SMTP server and the Telegram-like HTTP API
(tests/fakes). Producers feed a steady stream of events for ``--users`` users (instant
and digest prefs, hourly and daily digests, six time zones, email, Telegram and SMS)
through the ``alerts.ingest_event`` task, direct inserts and ``alerts ingest FILE``.

Time is accelerated through the events: their ``created_at`` follows a simulated clock
that runs ``--speed`` times faster than the real one and lies days in the past, so every
digest window is already closed and a new hourly window starts every 3600/speed seconds.
The workers run on the real clock (beat tasks take no ``now``), so every digest is due
when it is built and late events produce follow-up digests for the same window.

While it runs, faults are injected one every ``--fault-interval`` seconds (each kind at
least once, then at random) and counted: workers SIGKILLed (whole worker, or one pool
process) and restarted, Redis restarted (queues lost), PostgreSQL backends terminated, a
second beat, send tasks published twice, SMTP 451 bursts / 550 recipients / slow DATA,
Telegram 429 with retry_after / 403 blocked chats / 5xx, and ``python -m alerts.runner
--phase all`` next to the workers. Then faults stop, producers re-send any event that
never reached the database (event_key makes that safe), and the system drains (bounded
by ``--drain-timeout``). tests/system/soak/soak_check.py checks the invariants — among them, for the
blocked chats and hard-bounced mailboxes, that each block is for a destination the fakes
really refuse and that no request reaches a blocked address once its block is committed
(bar a send already in flight) — ; one summary line is printed; the exit status is 1 on any violation, 2 when the stack could not start.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from celery import Celery  # noqa: E402

from alerts.core import tables as m  # noqa: E402
from alerts.core.db import Database, make_engine, migrate  # noqa: E402
from alerts.phases.ingest import ingest_event  # noqa: E402
from tests.system.soak import soak_check  # noqa: E402
from tests.support.fakes.provider_api import BLOCKED, ProviderApi  # noqa: E402
from tests.support.fakes.smtp_server import MAILBOX_UNAVAILABLE, TRY_LATER, FakeSmtpServer  # noqa: E402

ADMIN_URL = os.environ.get("ALERTS_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
UTC = timezone.utc
HOURLY_PLAN = "pro"
TIMEZONES = (None, "Europe/Amsterdam", "America/New_York", "Asia/Kolkata", "Australia/Sydney", "UTC")
SEND_TIMES = (None, None, "07:30", "02:30", "18:00")  # §10.1 digest_send_time, by user id
ALERT_TYPES = ("supply_disruption", "price_spike", "regional_risk", "outage")
REGIONS = ("NL", "DE", "FR", "GB", "NO")
FAULTS = ("worker_kill", "pool_child_kill", "redis_restart", "pg_terminate", "pg_outage", "second_beat", "double_publish",
          "smtp_451_burst", "smtp_550", "smtp_slow_data", "tg_429", "tg_403", "tg_5xx", "runner", "unsubscribe")
WORKERS = 2
# docs/policy.md: critical events skip the digest; a share of the users keep quiet hours that
# started just before the run and end part-way through it (held deliveries are released
# while it runs, so it still drains); a share of the events tell stories in several
# updates (collapse_key), so digests collapse them and queued instant ones are superseded.
BYPASS_SEVERITY = 5
QUIET_SHARE = 0.3
COLLAPSE_SHARE = 0.4
STORIES = 25
DEFAULT_TZ = "Europe/Amsterdam"
LEASE_SECONDS = 30  # longer than any one send can take here (timeouts 10 s, slow DATA 2 s)
SEND_TIMEOUT_SECONDS = 10
SLOW_DATA_SECONDS = 2.0
READY_SECONDS = 60
SECOND_BEAT_SECONDS = 12
# The workers' environment besides the database, broker and providers.
WORKER_ENV = {
    "ALERTS_HOURLY_DIGEST_PLANS": HOURLY_PLAN,
    "ALERTS_RETRY_BASE_SECONDS": "2",
    "ALERTS_RETRY_MAX_SECONDS": "10",
    "ALERTS_SENDING_LEASE_SECONDS": str(LEASE_SECONDS),
    "ALERTS_SMTP_TIMEOUT_SECONDS": str(SEND_TIMEOUT_SECONDS),
    "ALERTS_HTTP_TIMEOUT_SECONDS": str(SEND_TIMEOUT_SECONDS),
    "ALERTS_REENQUEUE_AFTER_SECONDS": "15",
    "ALERTS_BEAT_INTAKE_SECONDS": "2",
    "ALERTS_BEAT_DIGEST_SECONDS": "5",
    "ALERTS_BEAT_DISPATCH_SECONDS": "2",
    "ALERTS_BEAT_RECOVER_SECONDS": "5",
    "ALERTS_SMTP_TLS": "none",
    # Every email carries the one-click headers; the unsubscribe fault POSTs to the web app.
    "ALERTS_PUBLIC_URL": "https://alerts.soak.test",
    "ALERTS_SECRET_KEY": "soak-secret-key-of-at-least-32-characters",
    "ALERTS_DIGEST_BYPASS_SEVERITY": str(BYPASS_SEVERITY),
}
UNSUBSCRIBE_GIVE_UP_SECONDS = 150  # a POST answered 503 (a send in flight) is tried again until then


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------

class Proc:
    """A child process in its own session (so a kill takes its children too), output to a file."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.expected_exit = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.expected_exit = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)
        self._log.close()

    def stop(self, timeout: float = 15) -> None:
        self.expected_exit = True
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def children(self) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        except OSError:
            return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


class TimedList(list):
    """A fake provider's list of accepted messages that also notes when each arrived."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def append(self, item) -> None:
        self.times.append(time.time())
        super().append(item)


# --- the stack ------------------------------------------------------------------------------

class Stack:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.db_name = f"alerts_soak_{self.run_id.replace('-', '_')}"
        self.admin = make_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.url = None
        self.engine = None
        self.redis_port = free_port()
        self.broker_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis: Proc | None = None
        self.smtp = FakeSmtpServer()
        self.api = ProviderApi()
        self.workers: list[Proc] = []
        self.beats: list[Proc] = []
        self.runners: list[Proc] = []
        self.lock = threading.Lock()
        self.names = itertools.count(1)
        self.crashes: Counter = Counter()  # processes that exited without being told to
        self.runner_exits: Counter = Counter()

    # --- start and stop ------------------------------------------------------------------

    def start(self) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{self.db_name}"')
        self.url = sa.engine.make_url(ADMIN_URL).set(database=self.db_name).render_as_string(hide_password=False)
        migrate(self.url)
        self.engine = make_engine(self.url)
        self.smtp.start()
        self.smtp._received = TimedList()
        self.api.start()
        self.api._httpd.handle_error = lambda request, address: None  # clients that hang up (killed workers)
        self.api.telegram_messages = TimedList()
        self.start_redis()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("ALERTS_", "CELERY_", "DATABASE_URL"))}
        self.env.update(WORKER_ENV, DATABASE_URL=self.url, CELERY_BROKER_URL=self.broker_url,
                        ALERTS_SMTP_HOST=self.smtp.host, ALERTS_SMTP_PORT=str(self.smtp.port),
                        ALERTS_TELEGRAM_BOT_TOKEN=self.api.bot_token,
                        ALERTS_TELEGRAM_API_BASE=self.api.telegram_api_base, PYTHONPATH=str(ROOT))
        self.client = Celery("soak-client", broker=self.broker_url)
        self.client.conf.update(task_serializer="json", accept_content=["json"], task_default_queue="alerts",
                                task_routes={"alerts.send_*": {"queue": "alerts.send"}},
                                broker_connection_retry_on_startup=True)

    def start_redis(self) -> None:
        self.redis = Proc(f"redis-{next(self.names)}", ["redis-server", "--port", str(self.redis_port), "--bind",
                                                        "127.0.0.1", "--save", "", "--appendonly", "no",
                                                        "--dir", str(self.work)], os.environ.copy(), self.work)
        client = redis.Redis(port=self.redis_port, socket_connect_timeout=1)

        def up():
            try:
                return client.ping()
            except redis.RedisError:
                return False
        wait_for(up, 15, "redis-server")

    def start_worker(self) -> Proc:
        n = next(self.names)
        worker = Proc(f"worker-{n}", [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--loglevel=INFO",
                                      "-n", f"soak{n}-{self.run_id}@localhost", "-Q", "alerts,alerts.send",
                                      "--pool=prefork", "--concurrency=2", "--without-gossip", "--without-mingle",
                                      "--without-heartbeat"], self.env, self.work)
        with self.lock:
            self.workers.append(worker)
        return worker

    def start_beat(self) -> Proc:
        n = next(self.names)
        beat = Proc(f"beat-{n}", [sys.executable, "-m", "celery", "-A", "celery_app", "beat", "--loglevel=INFO",
                                  "-s", str(self.work / f"beat-schedule-{n}"), "--max-interval", "1"],
                    self.env, self.work)
        with self.lock:
            self.beats.append(beat)
        return beat

    def start_runner(self) -> Proc:
        runner = Proc(f"runner-{next(self.names)}", [sys.executable, "-m", "alerts.runner", "--phase", "all",
                                                      "--json"], self.env, self.work)
        with self.lock:
            self.runners.append(runner)
        return runner

    def start_processes(self) -> None:
        for _ in range(WORKERS):
            self.start_worker()
        for worker in self.workers:
            wait_for(lambda: " ready." in worker.output() or not worker.alive(), READY_SECONDS, worker.name)
            if not worker.alive():
                raise RuntimeError(f"{worker.name} exited:\n{worker.output()[-3000:]}")
        self.start_beat()

    def supervise(self) -> None:
        """Keep two workers and one beat running; note the processes that died on their own;
        reap finished runners."""
        with self.lock:
            for group in (self.workers, self.beats):
                for proc in [p for p in group if not p.alive()]:
                    group.remove(proc)
                    if not proc.expected_exit:
                        self.crashes[proc.name.rsplit("-", 1)[0]] += 1
                        log(f"{proc.name} exited on its own (code {proc.popen.returncode}); see {proc.log_path}")
            for runner in [r for r in self.runners if not r.alive()]:
                self.runners.remove(runner)
                self.runner_exits[runner.popen.returncode] += 1
            workers, beats = len(self.workers), len(self.beats)
        for _ in range(WORKERS - workers):
            self.start_worker()
        if beats == 0:
            self.start_beat()

    def stop(self) -> None:
        for proc in self.beats + self.runners + self.workers:
            proc.stop()
        if self.redis is not None:
            self.redis.stop(5)
        for server in (self.smtp, self.api):
            try:
                server.stop()
            except Exception:  # noqa: BLE001 — teardown of a server that never started
                pass
        if self.engine is not None:
            self.engine.dispose()

    def allow_connections(self, allow: bool) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{self.db_name}" ALLOW_CONNECTIONS {str(allow).lower()}')

    def drop_database(self) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = %s AND pid <> pg_backend_pid()", (self.db_name,))
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.db_name}"')
        self.admin.dispose()


# --- users and prefs ------------------------------------------------------------------------

def seed_users(stack: Stack, n: int) -> dict:
    """``n`` users with 1–3 prefs each; some without an address, some inactive, some
    whose mail is refused (550) or whose chat blocked the bot (403) from the start."""
    rng = stack.rng
    users, prefs = [], []
    for i in range(1, n + 1):
        hourly = rng.random() < 0.4
        zone = rng.choice(TIMEZONES)
        users.append({"id": i, "email": f"user{i}@soak.test" if rng.random() < 0.92 else None,
                      "telegram_chat_id": str(700000 + i) if rng.random() < 0.7 else None,
                      "phone": None, "plan": HOURLY_PLAN if hourly and rng.random() < 0.75 else "free",
                      "timezone": zone, "digest_period": "hourly" if hourly else None,
                      "is_active": rng.random() > 0.03,
                      "quiet_hours": quiet_hours(zone, stack.args.duration) if rng.random() < QUIET_SHARE else None})
        users[-1]["digest_send_time"] = SEND_TIMES[i % len(SEND_TIMES)]
        seen = set()
        for _ in range(rng.randint(1, 3)):
            channel = rng.choices(("email", "telegram", "sms"), (55, 40, 5))[0]
            alert_type = rng.choice(ALERT_TYPES + ("*",))
            region = rng.choice(REGIONS + ("*",) * 2)
            if (alert_type, region, channel) in seen:
                continue
            seen.add((alert_type, region, channel))
            prefs.append({"user_id": i, "alert_type": alert_type, "region": region, "channel": channel,
                          "min_severity": rng.randint(1, 4), "enabled": rng.random() > 0.05,
                          "delivery_kind": "instant" if rng.random() < 0.35 else "digest"})
    with stack.engine.begin() as conn:
        conn.execute(sa.insert(m.users), users)
        conn.execute(sa.insert(m.user_alert_prefs), prefs)
        conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('users', 'id'), %s)", (n,))
    emails = [u["email"] for u in users if u["email"]]
    chats = [u["telegram_chat_id"] for u in users if u["telegram_chat_id"]]
    refused: dict[str, set[str]] = {"email": set(), "telegram": set()}  # gone destinations (docs/policy.md)
    for address in rng.sample(emails, max(1, len(emails) // 40)):
        stack.smtp.reject_recipient(address, MAILBOX_UNAVAILABLE)
        refused["email"].add(address)
    for chat in rng.sample(chats, max(1, len(chats) // 40)):
        stack.api.telegram_error(*BLOCKED, chat_id=chat)
        refused["telegram"].add(chat)
    return {"emails": emails, "chats": chats, "prefs": len(prefs), "refused": refused}


def quiet_hours(zone: str | None, duration: float) -> str:
    """A quiet period, in the user's local time, that began a minute ago and ends about
    half-way through the run (on a minute boundary)."""
    local = datetime.now(ZoneInfo(zone or DEFAULT_TZ))
    start = local.replace(second=0, microsecond=0) - timedelta(minutes=1)
    end = (local + timedelta(seconds=duration / 2 + 60)).replace(second=0, microsecond=0)
    return f"{start:%H:%M}-{end:%H:%M}"


# --- producers ------------------------------------------------------------------------------

class Producers:
    """A steady stream of events through three doors: the Celery task (most), a direct
    insert, and ``alerts ingest FILE`` batches. Some events are bad (Phase A must reject
    them), some are sent twice (a no-op)."""

    def __init__(self, stack: Stack, rate: float, speed: float, duration: float):
        self.stack = stack
        self.rng = random.Random(stack.args.seed + 1)
        self.rate, self.speed = rate, speed
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        # The whole simulated span ends two days before today: every window of any zone is closed.
        self.sim_start = today - timedelta(days=2) - timedelta(seconds=duration * speed)
        self.started = time.monotonic()
        self.produced: dict[str, dict] = {}
        self.valid: dict[str, bool] = {}
        self.via: Counter = Counter()
        self.unpublished: list[dict] = []  # the broker refused them; tried again later
        self.cli_batch: list[dict] = []
        self.stop_event = threading.Event()
        self.db = Database(stack.engine)
        self.counter = itertools.count(1)
        self.lock = threading.Lock()

    def sim_now(self) -> datetime:
        return self.sim_start + timedelta(seconds=(time.monotonic() - self.started) * self.speed)

    def make_event(self) -> tuple[dict, bool]:
        rng, n = self.rng, next(self.counter)
        lateness = rng.uniform(0, 600) if rng.random() > 0.05 else rng.uniform(3600, 6 * 3600)
        alert_type = rng.choice(ALERT_TYPES)
        event = {"event_key": f"soak-{self.stack.run_id}-{n}", "alert_type": alert_type,
                 "region": rng.choice(REGIONS), "severity": rng.randint(1, 5),
                 "title": f"Soak event {n}: {alert_type} <b>risk</b> & \"more\"",
                 "summary": rng.choice([None, f"Reason {n} — pipelines & <flows>", "Ünïcode ✓ 🔥"]),
                 "url": rng.choice([None, f"https://example.com/e/{n}?a=1&b=2"]),
                 "created_at": (self.sim_now() - timedelta(seconds=lateness * self.speed / 60)).isoformat()}
        if rng.random() < COLLAPSE_SHARE:
            event["collapse_key"] = f"story-{rng.randint(1, STORIES)}"
        valid = True
        if rng.random() < 0.02:
            valid = False
            event.update(rng.choice([{"severity": 9}, {"url": "javascript:alert(1)"}, {"title": "   "}]))
        return event, valid

    def run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            next_at += interval * self.rng.uniform(0.5, 1.5)
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))
            if self.rng.random() < 0.03 and self.produced:
                event = self.produced[self.rng.choice(list(self.produced))]  # sent again: a no-op
                self.via["repeated"] += 1
            else:
                event, valid = self.make_event()
                self.produced[event["event_key"]], self.valid[event["event_key"]] = event, valid
            door = self.rng.random()
            if door < 0.6:
                self.publish(event)
            elif door < 0.9:
                self.insert(event)
            else:
                with self.lock:
                    self.cli_batch.append(event)
            self.retry_unpublished()

    def publish(self, event: dict) -> bool:
        try:
            self.stack.client.send_task("alerts.ingest_event", args=[event],
                                        retry_policy={"max_retries": 1, "interval_start": 0.2})
        except Exception:  # noqa: BLE001 — the broker is down (a fault): keep it for later
            with self.lock:
                self.unpublished.append(event)
            return False
        self.via["task"] += 1
        return True

    def insert(self, event: dict) -> None:
        for _ in range(5):
            try:
                ingest_event(self.db, event)
                self.via["insert"] += 1
                return
            except sa.exc.DBAPIError:  # a terminated backend (a fault): once more
                time.sleep(0.2)
        self.publish(event)

    def retry_unpublished(self) -> None:
        with self.lock:
            pending, self.unpublished = self.unpublished, []
        for event in pending:
            if not self.publish(event):
                break

    def run_cli(self) -> None:
        """Every few seconds, the events set aside go in through ``alerts ingest FILE``."""
        while not self.stop_event.wait(5):
            self.flush_cli()

    def flush_cli(self) -> None:
        with self.lock:
            batch, self.cli_batch = self.cli_batch, []
        if not batch:
            return
        path = self.stack.work / f"ingest-{next(self.counter)}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in batch))
        result = subprocess.run([sys.executable, "-m", "alerts", "ingest", str(path)], cwd=ROOT, env=self.stack.env,
                                capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            self.via["cli"] += len(batch)
        else:  # e.g. its connection was terminated: the producer tries again
            log(f"alerts ingest exited {result.returncode}: {result.stderr.strip()[-300:]}")
            with self.lock:
                self.cli_batch.extend(batch)

    def resend_missing(self) -> int:
        """At-least-once producers: what never reached the database (a broker restart
        dropped the task) is sent again; event_key makes that harmless."""
        self.flush_cli()
        self.retry_unpublished()
        with self.stack.engine.connect() as conn:
            stored = set(conn.execute(sa.select(m.alert_events.c.event_key)).scalars())
        missing = [e for key, e in self.produced.items() if key not in stored]
        for event in missing:
            self.insert(event)
        return len(missing)


# --- faults -----------------------------------------------------------------------------------

class Faults:
    def __init__(self, stack: Stack, seed_info: dict, interval: float):
        self.stack = stack
        self.rng = random.Random(stack.args.seed + 2)
        self.interval = interval
        self.log: list[tuple[float, str]] = []  # (time.time(), kind)
        self.stop_event = threading.Event()
        self.emails, self.chats = seed_info["emails"], seed_info["chats"]
        self.refused = seed_info["refused"]
        self.timers: list[threading.Timer] = []
        self.errors: list[str] = []
        self.unsubscribes: list[tuple[int, str, float]] = []  # (user, channel, when the POST answered 200)
        self.unsubscribing: list[threading.Thread] = []

    def record(self, kind: str) -> None:
        self.log.append((time.time(), kind))

    def counts(self) -> Counter:
        return Counter(kind for _, kind in self.log)

    def run(self) -> None:
        order = list(FAULTS)
        self.rng.shuffle(order)
        while not self.stop_event.wait(self.interval * self.rng.uniform(0.7, 1.3)):
            kind = order.pop(0) if order else self.rng.choice(FAULTS)
            try:
                getattr(self, kind)()
            except Exception as exc:  # noqa: BLE001 — a fault that could not be injected is reported
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                log(f"fault {kind} failed: {exc}")

    def later(self, seconds: float, action) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    # --- the kinds -----------------------------------------------------------------------

    def worker_kill(self) -> None:
        with self.stack.lock:
            victim = self.rng.choice(self.stack.workers) if self.stack.workers else None
        if victim is not None:
            victim.kill()  # the machine dies: main process and pool at once
            self.record("worker_kill")

    def pool_child_kill(self) -> None:
        with self.stack.lock:
            workers = list(self.stack.workers)
        children = [pid for w in workers for pid in w.children()]
        if children:
            os.kill(self.rng.choice(children), signal.SIGKILL)  # one pool process dies mid-task
            self.record("pool_child_kill")

    def redis_restart(self) -> None:
        old = self.stack.redis
        old.stop(5)
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.stack.start_redis()
        self.record("redis_restart")

    def pg_terminate(self) -> None:
        with self.stack.admin.connect() as conn:
            conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = %s AND pid <> pg_backend_pid()", (self.stack.db_name,))
        self.record("pg_terminate")

    def pg_outage(self) -> None:
        """PostgreSQL unreachable for a moment (a failover): no new connections, the open
        ones dropped — sends in flight finish while their outcome cannot be written."""
        self.stack.allow_connections(False)
        try:
            self.pg_terminate()
            time.sleep(self.rng.uniform(1.0, 3.0))
        finally:
            self.stack.allow_connections(True)
        self.log[-1] = (self.log[-1][0], "pg_outage")

    def second_beat(self) -> None:
        beat = self.stack.start_beat()
        self.record("second_beat")
        self.later(SECOND_BEAT_SECONDS, beat.stop)

    def double_publish(self) -> None:
        with self.stack.engine.connect() as conn:
            digests = conn.execute(sa.select(m.user_alert_digests.c.id).order_by(sa.func.random()).limit(10)).scalars()
            deliveries = conn.execute(sa.select(m.user_alert_deliveries.c.id)
                                      .where(m.user_alert_deliveries.c.delivery_kind == "instant")
                                      .order_by(sa.func.random()).limit(10)).scalars()
            targets = [("alerts.send_digest", i) for i in digests] + [("alerts.send_delivery", i) for i in deliveries]
        for name, row_id in targets:
            for _ in range(2):
                self.stack.client.send_task(name, args=[row_id])
        self.record("double_publish")

    def smtp_451_burst(self) -> None:
        self.stack.smtp.fail_data(TRY_LATER, times=self.rng.randint(5, 20))
        self.record("smtp_451_burst")

    def smtp_550(self) -> None:
        for address in self.rng.sample(self.emails, min(2, len(self.emails))):
            self.stack.smtp.reject_recipient(address, MAILBOX_UNAVAILABLE)
            self.refused["email"].add(address)
        self.record("smtp_550")

    def smtp_slow_data(self) -> None:
        self.stack.smtp.data_delay = SLOW_DATA_SECONDS
        self.record("smtp_slow_data")
        self.later(6, lambda: setattr(self.stack.smtp, "data_delay", 0.0))

    def tg_429(self) -> None:
        wait = self.rng.randint(1, 4)
        self.stack.api.telegram_error(429, f"Too Many Requests: retry after {wait}", retry_after=wait,
                                      times=self.rng.randint(3, 10))
        self.record("tg_429")

    def tg_403(self) -> None:
        for chat in self.rng.sample(self.chats, min(2, len(self.chats))):
            self.stack.api.telegram_error(*BLOCKED, chat_id=chat)
            self.refused["telegram"].add(chat)
        self.record("tg_403")

    def tg_5xx(self) -> None:
        if self.rng.random() < 0.5:
            self.stack.api.telegram_error(500, "Internal Server Error", times=self.rng.randint(3, 10))
        else:
            self.stack.api.telegram_raw(502, "<html><body>502 Bad Gateway</body></html>", times=self.rng.randint(3, 10))
        self.record("tg_5xx")

    def runner(self) -> None:
        self.stack.start_runner()
        self.record("runner")

    def unsubscribe(self) -> None:
        """A one-click POST racing the senders, for a user who gets email (docs/web-and-security.md);
        soak_check then finds nothing arrived for them after the 200."""
        u, p = m.users, m.user_alert_prefs
        done = {user for user, _, _ in self.unsubscribes}
        with self.stack.engine.connect() as conn:
            candidates = sorted(set(conn.execute(
                sa.select(u.c.id).join(p, p.c.user_id == u.c.id)
                .where(u.c.email.is_not(None), p.c.channel == "email", p.c.enabled)).scalars()) - done)
        if not candidates:
            return
        thread = threading.Thread(target=self._unsubscribe, args=(self.rng.choice(candidates),), daemon=True)
        self.unsubscribing.append(thread)
        thread.start()
        self.record("unsubscribe")

    def _unsubscribe(self, user: int) -> None:
        from alerts.core.settings import Settings
        from alerts.core.tokens import make_token
        from alerts.web import create_app

        key = WORKER_ENV["ALERTS_SECRET_KEY"]
        app = create_app(Settings.from_env({"DATABASE_URL": self.stack.url, "ALERTS_SECRET_KEY": key}))
        client, path = app.test_client(), f"/unsubscribe/{make_token(key, user, 'email')}"
        started = time.monotonic()
        while time.monotonic() < started + UNSUBSCRIBE_GIVE_UP_SECONDS:
            status = client.post(path, data={"List-Unsubscribe": "One-Click"}).status_code
            if status == 200:
                self.unsubscribes.append((user, "email", time.time()))
                log(f"unsubscribed user {user} from email: 200 after {time.monotonic() - started:.2f}s")
                return
            if status != 503:  # 503: a send of theirs still in flight, or the database down
                break
            time.sleep(2)
        self.errors.append(f"unsubscribe: user {user} never got a 200 (last {status})")

    def finish_unsubscribes(self) -> None:
        for thread in self.unsubscribing:
            thread.join(UNSUBSCRIBE_GIVE_UP_SECONDS + 10)

    def calm(self) -> None:
        """Stop injecting: transient provider failures end (blocked chats and refused
        mailboxes stay, as they would), the extra beat goes."""
        self.stop_event.set()
        self.stack.allow_connections(True)
        for timer in self.timers:
            timer.cancel()
        smtp, api = self.stack.smtp, self.stack.api
        with smtp._lock:
            smtp._script.data.clear()
            smtp._script.mail.clear()
            smtp._script.data_delay = 0.0
        with api._lock:
            api._scripts[:] = [s for s in api._scripts if s.status == BLOCKED[0]]
        with self.stack.lock:
            extra = self.stack.beats[1:]
        for beat in extra:
            beat.stop()


# --- draining and checking ---------------------------------------------------------------------

def pending(stack: Stack) -> dict:
    e, d, g = m.alert_events, m.user_alert_deliveries, m.user_alert_digests
    with stack.engine.connect() as conn:
        return {
            "events": conn.execute(sa.select(sa.func.count()).where(e.c.status.in_(("new", "ready")))).scalar(),
            "deliveries": conn.execute(sa.select(sa.func.count()).where(d.c.status.in_(("queued", "sending")))).scalar(),
            "digests": conn.execute(sa.select(sa.func.count()).where(g.c.status.in_(("queued", "sending")))).scalar(),
        }


def drain(stack: Stack, timeout: float) -> tuple[bool, float, dict]:
    started = time.monotonic()
    deadline = started + timeout
    quiet = 0
    left = {}
    while time.monotonic() < deadline:
        stack.supervise()
        try:
            left = pending(stack)
        except sa.exc.DBAPIError:
            left = {"error": 1}
        with stack.lock:
            runners = len(stack.runners)
        quiet = quiet + 1 if not any(left.values()) and not runners else 0
        if quiet >= 3:  # three quiet looks a second apart: nothing left in flight
            return True, time.monotonic() - started, left
        time.sleep(1)
    return False, time.monotonic() - started, left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load and faults (default 60)")
    parser.add_argument("--users", type=int, default=300, help="users (default 300)")
    parser.add_argument("--rate", type=float, default=1.5, help="events per second (default 1.5)")
    parser.add_argument("--speed", type=float, default=60, help="simulated seconds per real second (default 60)")
    parser.add_argument("--fault-interval", type=float, default=4, help="seconds between faults (default 4)")
    parser.add_argument("--drain-timeout", type=float, default=150, help="longest wait for the drain (default 150)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the database and the logs")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON on stdout")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="alerts-soak-"))
    stack = Stack(args, work)
    failed = True
    try:
        try:
            stack.start()
            seed_info = seed_users(stack, args.users)
            stack.start_processes()
        except Exception as exc:  # noqa: BLE001
            log(f"could not start the stack: {type(exc).__name__}: {exc}")
            return 2
        log(f"stack up: db {stack.db_name}, redis :{stack.redis_port}, smtp :{stack.smtp.port}, "
            f"api {stack.api.base_url}, logs {work}")
        producers = Producers(stack, args.rate, args.speed, args.duration)
        # Often enough that every kind comes up at least once in the run.
        faults = Faults(stack, seed_info, min(args.fault_interval, args.duration / (len(FAULTS) + 4)))
        threads = [threading.Thread(target=producers.run, daemon=True),
                   threading.Thread(target=producers.run_cli, daemon=True),
                   threading.Thread(target=faults.run, daemon=True)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            stack.supervise()
            time.sleep(0.5)
        producers.stop_event.set()
        faults.calm()
        for thread in threads:
            thread.join(120)
        faults.calm()  # a fault that was mid-way when told to stop
        stack.supervise()
        resent = producers.resend_missing()
        log(f"load over after {args.duration:.0f}s: {len(producers.produced)} events, faults "
            f"{dict(faults.counts())}; draining (re-sent {resent} events the broker lost)")
        drained, drain_seconds, left = drain(stack, args.drain_timeout)
        if not drained:
            log(f"not drained after {args.drain_timeout:.0f}s: {left}")
        faults.finish_unsubscribes()

        arrivals = (soak_check.email_arrivals(stack.smtp.messages, list(stack.smtp._received.times))
                    + soak_check.telegram_arrivals(list(stack.api.telegram_messages),
                                                   list(stack.api.telegram_messages.times)))
        with stack.engine.connect() as conn:
            report = soak_check.check(conn, producers.valid, arrivals, faults.log, frozenset({HOURLY_PLAN}),
                                      DEFAULT_TZ, "daily", unsubscribes=faults.unsubscribes,
                                      bypass_severity=BYPASS_SEVERITY)
            soak_check.check_blocks(report, conn, faults.refused, {"email": list(stack.smtp.rcpt_log),
                                                                   "telegram": list(stack.api.telegram_requests)})
        if faults.errors:
            report.bad("fault_not_injected", "; ".join(faults.errors[:5]))
        c = report.counts
        fault_counts = dict(sorted(faults.counts().items()))
        summary = {
            "duration": args.duration, "users": args.users, "seed": args.seed,
            "events": c["events"], "rejected": c["events_rejected"], "deliveries": c["deliveries"],
            "digests": c["digests"], "messages": c["messages"], "email": c["messages_email"],
            "telegram": c["messages_telegram"], "faults": fault_counts, "duplicates": report.duplicates,
            "crash_window_duplicates": report.crash_window, "lost": report.lost,
            "violations": len(report.violations), "drained_s": round(drain_seconds, 1),
            "producer_resent": resent, "ingest": dict(producers.via), "crashes": dict(stack.crashes),
            "runner_exits": {str(k): v for k, v in stack.runner_exits.items()},
            "blocks": {"email": c["blocks_email"], "telegram": c["blocks_telegram"],
                       "skipped": c["destination_disabled_skips"], "requests_after": c["requests_after_block"],
                       "latest_request_after_ms": c["latest_request_after_block_ms"]},
            "accounted": {k: v for k, v in sorted(c.items()) if k.startswith(("instant_", "in_digest_", "digests_",
                                                                                 "digest_kind"))},
            "superseded": c["instant_superseded"], "held_by_quiet_hours": c["instant_held_by_quiet_hours"],
        }
        for text in report.excused:
            log(f"crash-window duplicate (the one duplicate window: docs/architecture.md): {text}")
        for v in report.violations[:25]:
            log(f"VIOLATION {v.kind}: {v.detail}")
        if len(report.violations) > 25:
            log(f"… and {len(report.violations) - 25} more violations "
                f"({dict(Counter(v.kind for v in report.violations))})")
        print(f"soak: duration={args.duration:g}s users={args.users} seed={args.seed} events={c['events']} "
              f"(rejected {c['events_rejected']}) deliveries={c['deliveries']} digests={c['digests']} "
              f"messages={c['messages']} (email {c['messages_email']}, telegram {c['messages_telegram']}) "
              f"faults={sum(fault_counts.values())} {json.dumps(fault_counts, separators=(',', ':'))} "
              f"duplicates={report.duplicates} crash_window={report.crash_window} lost={report.lost} "
              f"violations={len(report.violations)} drained={'yes' if drained else 'NO'} in {drain_seconds:.0f}s "
              f"blocks={c['blocks_email'] + c['blocks_telegram']} (skipped {c['destination_disabled_skips']}, "
              f"requests after a block {c['requests_after_block']}, latest +{c['latest_request_after_block_ms']}ms) "
              f"superseded={c['instant_superseded']} held_by_quiet_hours={c['instant_held_by_quiet_hours']} "
              f"crashes={json.dumps(dict(stack.crashes), separators=(',', ':'))}",
              flush=True)
        if args.json:
            print(json.dumps(summary), flush=True)
        failed = bool(report.violations) or not drained
        return 1 if failed else 0
    finally:
        stack.stop()
        if args.keep or failed:
            log(f"kept logs in {work}" + (f" and database {stack.db_name}" if args.keep else ""))
        else:
            shutil.rmtree(work, ignore_errors=True)
        if stack.url is not None:
            stack.allow_connections(True)
            if not args.keep:
                stack.drop_database()


if __name__ == "__main__":
    sys.exit(main())
