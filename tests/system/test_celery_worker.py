"""Real ``celery worker`` and ``celery beat`` processes, PostgreSQL and the test SMTP
server: what production runs, end to end — on both brokers docs/deployment.md supports.

Each test runs twice: on Redis (a database of the session's private redis-server,
flushed around the test) and on RabbitMQ (a vhost of the test's own, created for it and
deleted after, so no queue or message outlives it). On RabbitMQ the Telegram limiter
keeps a Redis of its own through ALERTS_RATELIMIT_REDIS_URL, as config requires.
Every process is started in its own session and killed in teardown.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from alerts.core import tables as m
from alerts.core.settings import INFRA_BACKOFF_MAX_SECONDS, MAX_COUNTDOWN_SECONDS, Settings
from tests.support.e2e_runner import KEPT_VARIABLES
from tests.support.factories import add_event, add_pref, add_user
from tests.support.factories import WINDOW_START, add_digest
from tests.integration.celery.test_tasks import AFTER_WINDOW, iso

ROOT = Path(__file__).resolve().parents[2]
READY_SECONDS = 30
BROKER_DB, RATELIMIT_DB = 11, 12
AMQP_ROOT = os.environ.get("ALERTS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")  # no vhost
AMQP_USER = AMQP_ROOT.split("://", 1)[1].split(":", 1)[0]
_names = itertools.count(1)


# --- processes ------------------------------------------------------------------------------

class Process:
    """A celery command in its own session, its output in a log file."""

    stop_signal = signal.SIGTERM

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen([sys.executable, "-m", "celery", "-A", "celery_app", *args], cwd=ROOT,
                                      env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = READY_SECONDS) -> None:
        wait_until(lambda: text in self.output() or self.popen.poll() is not None, timeout, self.output)
        assert text in self.output(), self.output()

    def signal(self, signum: int, group: bool = False) -> None:
        if self.popen.poll() is None:
            (os.killpg if group else os.kill)(self.popen.pid, signum)

    def stop(self) -> None:
        try:
            self.signal(self.stop_signal)
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)  # the pool's children too
            except ProcessLookupError:
                pass
            self.popen.wait(5)
            self._log.close()


def wait_until(predicate, timeout: float, describe=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s\n{describe()}")
        time.sleep(0.1)


def celery_env(broker_url: str, database_url: str, smtp_host: str, smtp_port: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k in KEPT_VARIABLES or not k.startswith(("ALERTS_", "CELERY_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": database_url, "CELERY_BROKER_URL": broker_url, "ALERTS_SMTP_HOST": smtp_host,
                "ALERTS_SMTP_PORT": str(smtp_port), "ALERTS_SMTP_TLS": "none", "PYTHONPATH": str(ROOT), **extra})
    return env


def start_worker(env: dict, tmp_path: Path, queues: str = "alerts,alerts.send", pool: str = "prefork",
                 concurrency: int = 2, *extra: str) -> Process:
    name = f"test{next(_names)}-{os.getpid()}@localhost"
    worker = Process(["worker", "--loglevel=INFO", "-n", name, "-Q", queues, f"--pool={pool}",
                      f"--concurrency={concurrency}", "--without-gossip", "--without-mingle",
                      "--without-heartbeat", *extra], env, tmp_path / f"worker-{next(_names)}.log")
    worker.name = name
    # Teardown needs no warm shutdown (the test's queues and rows are thrown away; the
    # SIGTERM test sends its own): a cold one is quicker — on RabbitMQ 2 s instead of 5.
    worker.stop_signal = signal.SIGQUIT
    try:
        worker.wait_for_output(" ready.")
    except BaseException:
        worker.stop()
        raise
    return worker


# --- fixtures ---------------------------------------------------------------------------------

class RabbitVhost:
    """A RabbitMQ vhost of one test's own, made with rabbitmqctl and deleted after."""

    def __init__(self):
        self.name = f"alerts-test-{os.getpid()}-{next(_names)}"
        self._ctl("add_vhost", self.name)
        self._ctl("set_permissions", "-p", self.name, AMQP_USER, ".*", ".*", ".*")
        self.url = f"{AMQP_ROOT}/{self.name}"

    @staticmethod
    def _ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    def delete(self) -> None:
        self._ctl("delete_vhost", self.name)


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request, redis_server):
    """The test's broker: a flushed Redis database, or a RabbitMQ vhost of its own."""
    if request.param == "redis":
        client = redis.Redis.from_url(redis_server.url(BROKER_DB))
        client.flushdb()
        yield redis_server.url(BROKER_DB)
        client.flushdb()
        client.close()
    else:
        vhost = RabbitVhost()
        try:
            yield vhost.url
        finally:
            vhost.delete()


# For tests whose subject is the rows' claims and leases, not the broker: on RabbitMQ they
# would add a minute to the suite and test nothing new.
redis_only = pytest.mark.parametrize("broker_url", ["redis"], indirect=True)


@pytest.fixture
def broker_env(broker_url, redis_server) -> dict:
    """What a worker needs beside the broker: the limiter's Redis when the broker is not one."""
    return {} if broker_url.startswith("redis") else {"ALERTS_RATELIMIT_REDIS_URL": redis_server.url(RATELIMIT_DB)}


@pytest.fixture
def client(broker_url):
    """Publishes like a producer would: JSON, to the queue the app routes to."""
    app = Celery("test-client", broker=broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"], task_default_queue="alerts",
                    task_routes={"alerts.send_*": {"queue": "alerts.send"}})
    yield app
    app.close()


@pytest.fixture
def worker(broker_url, broker_env, pg_database, smtp_server_session, tmp_path_factory):
    """One worker (prefork, 2 processes) for the test, at the test SMTP server."""
    env = celery_env(broker_url, pg_database, smtp_server_session.host, smtp_server_session.port, **broker_env)
    process = start_worker(env, tmp_path_factory.mktemp("worker"))
    yield process
    process.stop()


def status_of(conn, table, row_id: int) -> tuple[str, int]:
    found = conn.execute(sa.select(table.c.status, table.c.attempts).where(table.c.id == row_id)).one()
    return found.status, found.attempts


def message_ids(smtp_server) -> list[str]:
    return [mail.message["Message-ID"] for mail in smtp_server.messages]


class Blackhole:
    """A TCP server that accepts connections and never says a word: an SMTP server that
    hangs, so a send is in flight for as long as the test wants."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


# --- tests --------------------------------------------------------------------------------------

@redis_only  # settings are checked before any broker is reached
def test_a_worker_with_a_bad_setting_exits_2_naming_it(broker_url, broker_env, pg_database, tmp_path):
    env = celery_env(broker_url, pg_database, "127.0.0.1", 25, ALERTS_SMTP_TLS="sometimes", **broker_env)
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "celery_app", "worker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "ALERTS_SMTP_TLS" in result.stderr


@pytest.mark.parametrize("command", [["-m", "celery", "-A", "celery_app", "worker"], ["-m", "alerts", "status"]])
def test_rabbitmq_with_a_bot_token_and_no_ratelimit_redis_exits_2_naming_it(command, sqlite_url):
    """docs/deployment.md: without a Redis to share it in, the Telegram limit would silently be off."""
    env = celery_env(f"{AMQP_ROOT}/", sqlite_url, "127.0.0.1", 25, ALERTS_TELEGRAM_BOT_TOKEN="123:abc")
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert "ALERTS_RATELIMIT_REDIS_URL" in result.stderr
    assert "123:abc" not in result.stderr


def test_the_longest_wait_a_task_holds_unacked_is_far_below_rabbitmqs_consumer_timeout():
    """RabbitMQ closes the channel of a consumer holding a message unacked longer than
    consumer_timeout (default 30 min); a worker holds a countdown task unacked until it
    runs, so every countdown must stay far below it (replit.md, "Choosing a broker")."""
    result = subprocess.run(["rabbitmqctl", "-q", "eval", "application:get_env(rabbit, consumer_timeout)."],
                            capture_output=True, text=True, timeout=60, check=True)
    found = re.fullmatch(r"\{ok,(\d+)\}", result.stdout.strip())
    if found is None:
        assert result.stdout.strip() == "undefined", result.stdout  # no timeout at all
        return
    consumer_timeout_seconds = int(found.group(1)) / 1000
    assert 10 * max(MAX_COUNTDOWN_SECONDS, INFRA_BACKOFF_MAX_SECONDS) <= consumer_timeout_seconds


@redis_only
def test_a_worker_whose_database_is_unreachable_logs_one_line_per_attempt_and_keeps_running(
        client, broker_url, broker_env, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe is closed
    url = f"postgresql://alerts:s3cret-pw@127.0.0.1:{port}/alerts"
    worker = start_worker(celery_env(broker_url, url, "127.0.0.1", 25, **broker_env), tmp_path, pool="threads",
                          concurrency=1)
    try:
        client.send_task("alerts.intake")
        attempts = lambda: [line for line in worker.output().splitlines() if " retry: Retry in " in line]
        wait_until(lambda: len(attempts()) >= 3, 60, worker.output)
        assert worker.popen.poll() is None, "the worker keeps running and retrying"
    finally:
        worker.stop()
    for line in attempts():
        assert "Connection refused" in line
    assert "s3cret-pw" not in worker.output()


def test_the_worker_registers_every_spec_task(worker, broker_url, broker_env, pg_database, smtp_server_session):
    env = celery_env(broker_url, pg_database, smtp_server_session.host, smtp_server_session.port, **broker_env)
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "celery_app", "inspect", "registered", "--json",
                             "--timeout", "10", "--destination", worker.name],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    registered = json.loads(result.stdout)[worker.name]
    assert {"alerts.intake", "alerts.fanout", "alerts.build_digests", "alerts.dispatch_deliveries",
            "alerts.send_digest", "alerts.send_delivery", "alerts.recover_stale", "alerts.run_pipeline",
            "alerts.ingest_event"} <= set(registered)


def test_celery_call_run_pipeline_delivers_to_the_smtp_server(worker, broker_url, broker_env, conn, smtp_server,
                                                              pg_database):
    instant_user, digest_user = add_user(conn), add_user(conn)
    add_pref(conn, instant_user)
    add_pref(conn, digest_user, delivery_kind="digest")
    add_event(conn, created_at=WINDOW_START + timedelta(hours=10))
    env = celery_env(broker_url, pg_database, smtp_server.host, smtp_server.port, **broker_env)

    result = subprocess.run([sys.executable, "-m", "celery", "-A", "celery_app", "call", "alerts.run_pipeline",
                             "--kwargs", json.dumps({"now": iso(AFTER_WINDOW)})],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(smtp_server.messages) >= 2, 30, worker.output)
    assert sorted(mail.rcpt_tos[0] for mail in smtp_server.messages) == sorted(
        conn.execute(sa.select(m.users.c.email)).scalars())


def test_send_digest_called_three_times_sends_one_message(worker, client, conn, smtp_server):
    digest = add_digest(conn, add_user(conn), events=3)

    tasks = [client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(AFTER_WINDOW)})
             for _ in range(3)]

    wait_until(lambda: all(f"[{task.id}] succeeded" in worker.output() for task in tasks), 30, worker.output)
    assert len(smtp_server.messages) == 1
    assert status_of(conn, m.user_alert_digests, digest) == ("sent", 1)


@pytest.mark.slow
@redis_only
def test_a_threads_pool_worker_sends_each_digest_once_whatever_the_repeats(client, broker_url, broker_env, conn,
                                                                           smtp_server, pg_database, tmp_path):
    """The pool replit.md recommends for the send queue: four threads in one process
    racing for the same rows."""
    digests = [add_digest(conn, add_user(conn), events=2) for _ in range(12)]
    threaded = start_worker(celery_env(broker_url, pg_database, smtp_server.host, smtp_server.port, **broker_env),
                            tmp_path, queues="threads-test", pool="threads", concurrency=4)
    try:
        tasks = [client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(AFTER_WINDOW)},
                                  queue="threads-test") for _ in range(3) for digest in digests]
        wait_until(lambda: all(f"[{task.id}] succeeded" in threaded.output() for task in tasks), 60,
                   threaded.output)
    finally:
        threaded.stop()
    assert sorted(message_ids(smtp_server)) == sorted(set(message_ids(smtp_server)))
    assert len(smtp_server.messages) == len(digests)
    assert {status_of(conn, m.user_alert_digests, digest) for digest in digests} == {("sent", 1)}


@pytest.mark.slow
@redis_only
def test_a_digest_claimed_by_a_killed_worker_is_sent_after_the_lease(worker, client, broker_url, broker_env, conn,
                                                                      smtp_server, pg_database, tmp_path):
    digest = add_digest(conn, add_user(conn))
    hang = Blackhole()
    doomed = start_worker(celery_env(broker_url, pg_database, "127.0.0.1", hang.port, **broker_env), tmp_path,
                          queues="kill-test", concurrency=1)
    try:
        client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(AFTER_WINDOW)}, queue="kill-test")
        wait_until(lambda: hang.accepted and status_of(conn, m.user_alert_digests, digest)[0] == "sending",
                   30, doomed.output)
        doomed.signal(signal.SIGKILL, group=True)  # the machine dies mid-send
        doomed.popen.wait(10)
    finally:
        doomed.stop()
        hang.close()
    assert status_of(conn, m.user_alert_digests, digest) == ("sending", 1)

    after_lease = AFTER_WINDOW + timedelta(seconds=Settings().sending_lease_seconds + 1)
    client.send_task("alerts.recover_stale", kwargs={"now": iso(after_lease)})

    wait_until(lambda: status_of(conn, m.user_alert_digests, digest)[0] == "sent", 30, worker.output)
    assert status_of(conn, m.user_alert_digests, digest) == ("sent", 2)
    assert len(smtp_server.messages) == 1


@pytest.mark.slow
def test_a_worker_killed_right_after_a_send_leaves_no_duplicate(client, broker_url, broker_env, conn, smtp_server,
                                                                pg_database, tmp_path):
    """The pool process dies after the send task returned but before Celery acked it: the
    broker redelivers the task, and the outcome committed before the return makes the
    rerun a no-op — no second message, now or after the lease (the only duplicate docs/architecture.md allows is a death between the provider's answer and that commit)."""
    digest = add_digest(conn, add_user(conn))
    marker = tmp_path / "died"
    env = celery_env(broker_url, pg_database, smtp_server.host, smtp_server.port, **broker_env,
                     ALERTS_TEST_DIE_ONCE=str(marker))
    worker = start_worker(env, tmp_path, "kill-test", "prefork", 1, "--include", "tests.support.worker_hooks")
    try:
        task = client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(AFTER_WINDOW)},
                                queue="kill-test")
        # Celery logs "succeeded" before task_postrun kills the process, so the first run
        # shows up too: wait for the loss and for the redelivered run in a fresh process.
        succeeded = f"Task alerts.send_digest[{task.id}] succeeded"
        wait_until(lambda: "WorkerLostError" in worker.output() and worker.output().count(succeeded) >= 2,
                   60, worker.output)
        assert marker.exists()
        after_lease = AFTER_WINDOW + timedelta(seconds=Settings().sending_lease_seconds + 1)
        recover = client.send_task("alerts.recover_stale", kwargs={"now": iso(after_lease)}, queue="kill-test")
        again = client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(after_lease)},
                                 queue="kill-test")
        wait_until(lambda: all(f"[{t.id}] succeeded" in worker.output() for t in (recover, again)),
                   30, worker.output)
    finally:
        worker.stop()
    assert status_of(conn, m.user_alert_digests, digest) == ("sent", 1)
    assert len(smtp_server.messages) == 1


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_sigterm_lets_the_send_in_flight_finish(client, broker_url, broker_env, conn, smtp_server, pg_database, tmp_path,
                                                pool):
    digest = add_digest(conn, add_user(conn))
    smtp_server.data_delay = 1.5
    leaving = start_worker(celery_env(broker_url, pg_database, smtp_server.host, smtp_server.port, **broker_env),
                           tmp_path, queues="term-test", pool=pool, concurrency=1)
    try:
        client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(AFTER_WINDOW)}, queue="term-test")
        wait_until(lambda: status_of(conn, m.user_alert_digests, digest)[0] == "sending", 30, leaving.output)
        leaving.signal(signal.SIGTERM)
        assert leaving.popen.wait(20) == 0
    finally:
        leaving.stop()
    assert status_of(conn, m.user_alert_digests, digest) == ("sent", 1)
    assert len(smtp_server.messages) == 1


@pytest.mark.slow
def test_two_beat_schedulers_at_once_send_nothing_twice(worker, broker_url, broker_env, conn, smtp_server, pg_database,
                                                        tmp_path):
    yesterday = datetime.now(timezone.utc) - timedelta(days=2)  # its digest window has closed
    digest_users = [add_user(conn) for _ in range(3)]
    instant_users = [add_user(conn) for _ in range(2)]
    for user in digest_users:
        add_pref(conn, user, delivery_kind="digest")
    for user in instant_users:
        add_pref(conn, user)
    for n in range(4):
        add_event(conn, created_at=yesterday + timedelta(minutes=n))
    expected = len(instant_users) * 4 + len(digest_users)
    env = celery_env(broker_url, pg_database, smtp_server.host, smtp_server.port, **broker_env,
                     ALERTS_BEAT_INTAKE_SECONDS="1", ALERTS_BEAT_DIGEST_SECONDS="1", ALERTS_BEAT_DISPATCH_SECONDS="1",
                     ALERTS_BEAT_RECOVER_SECONDS="1")
    beats = [Process(["beat", "--loglevel=INFO", "-s", str(tmp_path / f"schedule-{n}"), "--max-interval", "1"],
                     env, tmp_path / f"beat-{n}.log") for n in range(2)]
    try:
        wait_until(lambda: len(smtp_server.messages) >= expected, 60,
                   lambda: worker.output()[-3000:] + beats[0].output()[-2000:])
        ticks = [beat.output().count("Sending due task") for beat in beats]
        for beat, before in zip(beats, ticks):  # both keep ticking a while longer
            wait_until(lambda: beat.output().count("Sending due task") >= before + 8, 30, beat.output)
    finally:
        for beat in beats:
            beat.stop()
    ids = message_ids(smtp_server)
    assert len(ids) == len(set(ids)) == expected
