"""Supervision (issue 13 point 6): the systemd units in deploy/systemd/, and what a
supervisor has to do when Redis restarts under a worker — start it again, after which
the queue drains with nothing lost and nothing sent twice."""
from __future__ import annotations

import configparser
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery

from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.core.db import RECONNECT_PAUSES_SECONDS, make_engine
from tests.support.factories import add_digest, add_user
from tests.system.test_celery_worker import celery_env, message_ids, start_worker, status_of, wait_until
from tests.integration.celery.test_tasks import AFTER_WINDOW, iso

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
UNIT_NAMES = ("alerts-worker.service", "alerts-beat.service", "alerts-web.service")
INSTALL_DIR = "/opt/energyriskiq-alerts"


# --- the units ------------------------------------------------------------------------------

def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((UNITS / name).read_text())
    return unit


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_each_unit_restarts_always_as_an_unprivileged_user_with_the_settings_file(name):
    service = read_unit(name)["Service"]
    assert service["Restart"] == "always"
    assert service["User"] == "alerts" and service["Group"] == "alerts"
    assert service["WorkingDirectory"] == INSTALL_DIR
    assert service["EnvironmentFile"] == "/etc/energyriskiq-alerts/env"
    assert service["ExecStart"].startswith(f"{INSTALL_DIR}/venv/bin/")
    assert service["KillSignal"] == "SIGTERM"
    assert read_unit(name)["Install"]["WantedBy"] == "multi-user.target"


def test_the_worker_unit_lets_the_send_in_flight_finish_before_it_kills():
    service = read_unit("alerts-worker.service")["Service"]
    # SIGTERM to the main process only: Celery's warm shutdown, children finish their task.
    assert service["KillMode"] == "mixed"
    longest_send = Settings().smtp_timeout_seconds + sum(RECONNECT_PAUSES_SECONDS)
    assert int(service["TimeoutStopSec"]) > 2 * longest_send
    args = service["ExecStart"].split()
    assert args[1:4] == ["-A", "celery_app", "worker"]
    assert args[args.index("-Q") + 1] == "alerts,alerts.send"
    assert "worker@%%h" in args, "systemd's %h is the home directory; %%h reaches Celery as its host name"


def test_the_beat_unit_keeps_its_schedule_in_its_state_directory():
    service = read_unit("alerts-beat.service")["Service"]
    assert service["StateDirectory"] == "energyriskiq-alerts"
    assert "--schedule /var/lib/energyriskiq-alerts/celerybeat-schedule" in service["ExecStart"]


def test_the_web_unit_runs_the_wsgi_app_under_gunicorn():
    assert read_unit("alerts-web.service")["Service"]["ExecStart"].split()[-1] == "alerts.web:app"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units(tmp_path):
    """``systemd-analyze verify`` checks keys, values and specifiers; it also wants the
    programs to exist, so the units are verified with their install directory here."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for program in ("celery", "gunicorn"):
        (bin_dir / program).write_text("#!/bin/sh\n")
        (bin_dir / program).chmod(0o755)
    for name in UNIT_NAMES:
        (tmp_path / name).write_text((UNITS / name).read_text().replace(f"{INSTALL_DIR}/venv", str(tmp_path / "venv")))
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNIT_NAMES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


# --- a Redis restart under a worker -----------------------------------------------------------

class PersistentRedis:
    """A redis-server of this test's own that keeps its data (append-only file) across
    a restart on the same port, as a production Redis does."""

    def __init__(self, directory: Path):
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 10)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def persistent_redis(tmp_path):
    server = PersistentRedis(tmp_path)
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_after_a_redis_restart_a_worker_exits_non_zero_or_stays_and_a_restarted_one_drains_the_queue(
        persistent_redis, pg_url, smtp_server, tmp_path, request, pool):
    engine = make_engine(pg_url)
    db = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    request.addfinalizer(lambda: (db.close(), engine.dispose()))
    client = Celery("test-client", broker=persistent_redis.url())
    client.conf.update(task_serializer="json", accept_content=["json"])
    request.addfinalizer(client.close)
    env = celery_env(persistent_redis.url(), pg_url, smtp_server.host, smtp_server.port)

    def publish(digests, queue):
        for digest in digests:
            client.send_task("alerts.send_digest", args=[digest], kwargs={"now": iso(AFTER_WINDOW)}, queue=queue)

    first = start_worker(env, tmp_path, queues="alerts.send", pool=pool, concurrency=2)
    try:
        before = [add_digest(db, add_user(db)) for _ in range(3)]
        publish(before, "alerts.send")
        wait_until(lambda: len(smtp_server.messages) == 3, 30, first.output)
        # Waiting in a queue no worker reads yet: they must outlive the restart.
        waiting = [add_digest(db, add_user(db)) for _ in range(10)]
        publish(waiting, "drain-test")
        # And sends in flight while Redis goes away: their acks are lost with it.
        smtp_server.data_delay = 1.0
        in_flight = [add_digest(db, add_user(db)) for _ in range(4)]
        publish(in_flight, "alerts.send")
        wait_until(lambda: status_of(db, m.user_alert_digests, in_flight[0])[0] == "sending", 30, first.output)

        persistent_redis.restart(down_seconds=2.0)  # down long enough for reconnects to fail

        # kombu's Redis transport may make the worker exit (kombu#970, #582): then it must
        # say so with a non-zero code, so that Restart= (any supervisor) brings it back.
        reconnected = lambda: first.output().count("Connected to redis://") >= 2
        wait_until(lambda: first.popen.poll() is not None or reconnected(), 60, first.output)
        time.sleep(2)  # an exit may follow the reconnect
        code = first.popen.poll()
        assert code is None or code != 0, first.output()
        if code is None:  # it stayed: then it must still work
            smtp_server.data_delay = 0.0
            survivor = add_digest(db, add_user(db))
            publish([survivor], "alerts.send")
            wait_until(lambda: status_of(db, m.user_alert_digests, survivor)[0] == "sent", 30, first.output)
            in_flight.append(survivor)
    finally:
        first.stop()
    smtp_server.data_delay = 0.0

    after = [add_digest(db, add_user(db)) for _ in range(5)]
    publish(after, "alerts.send")
    restarted = start_worker(env, tmp_path, queues="alerts.send,drain-test")
    try:
        everything = before + waiting + in_flight + after
        wait_until(lambda: {status_of(db, m.user_alert_digests, d)[0] for d in everything} == {"sent"}, 60,
                   restarted.output)
    finally:
        restarted.stop()
    assert len(smtp_server.messages) == len(everything)
    assert len(set(message_ids(smtp_server))) == len(everything)
    assert db.execute(sa.select(sa.func.count()).select_from(m.user_alert_digests)
                      .where(m.user_alert_digests.c.attempts != 1)).scalar_one() == 0
