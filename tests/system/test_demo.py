"""`alerts demo` is sealed off from a real installation: whatever DATABASE_URL and the
provider settings say, it runs on its own SQLite file and writes every message to files,
reaching no database, SMTP server, Redis, Telegram or Twilio of the environment."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading

from alerts.core.db import make_engine
from tests.support.e2e_runner import ROOT, RUN_TIMEOUT_SECONDS, dump_database, runner_env
from tests.support.factories import add_delivery, add_event, add_pref, add_user


class Listener:
    """A TCP port that accepts connections and says nothing: it only counts who came."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def run_demo(cwd, env: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "alerts", "demo", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_SECONDS)


def seed_a_real_installation(url: str) -> None:
    """Subscribers on every channel, a severity-5 event not yet judged and a queued delivery."""
    engine = make_engine(url)
    with engine.begin() as conn:
        reader = add_user(conn, email="real.reader@example.com", telegram_chat_id="4242", phone="+31611111111")
        for channel in ("email", "telegram", "sms"):
            add_pref(conn, reader, channel=channel)
        add_event(conn, severity=5, status="new")
        add_delivery(conn, reader, add_event(conn, severity=5, status="fanned_out"), channel="telegram")
    engine.dispose()


def outbox_files(directory) -> dict[str, list[str]]:
    found = {"email": [], "telegram": [], "sms": []}
    for path in sorted((directory / "outbox").iterdir()):
        kind = "email" if path.suffix == ".eml" else path.name.split("-", 1)[0]
        found[kind].append(path.read_text())
    return found


def test_the_demo_leaves_the_database_and_the_providers_of_the_environment_alone(pg_url, smtp_server, provider_api,
                                                                                 tmp_path):
    seed_a_real_installation(pg_url)
    before = dump_database(pg_url)
    redis = Listener()
    env = runner_env(pg_url, smtp_server, provider_api, CELERY_BROKER_URL=f"redis://127.0.0.1:{redis.port}/0",
                     ALERTS_RATELIMIT_REDIS_URL=f"redis://127.0.0.1:{redis.port}/1",
                     ALERTS_OUTBOX_DIR=str(tmp_path / "production-outbox"))
    try:
        result = run_demo(tmp_path, env)
    finally:
        redis.close()

    assert result.returncode == 0, result.stderr
    assert dump_database(pg_url) == before
    assert (smtp_server.connections, provider_api.requests, redis.accepted) == (0, [], 0)
    assert (tmp_path / "alerts-demo.db").is_file()
    assert not (tmp_path / "production-outbox").exists()
    written = outbox_files(tmp_path)
    assert all(written.values()), "email, Telegram and SMS each went to a file"
    assert not any("real.reader" in text or "4242" in text for texts in written.values() for text in texts)


def test_the_demo_never_connects_to_the_database_url_it_is_given(tmp_path):
    database = Listener()
    try:
        result = run_demo(tmp_path, runner_env(f"postgresql://alerts:pw@127.0.0.1:{database.port}/alerts"),
                          "--db", str(tmp_path / "mine.db"), "--outbox", str(tmp_path / "out"))
    finally:
        database.close()

    assert result.returncode == 0, result.stderr
    assert database.accepted == 0
    assert (tmp_path / "mine.db").is_file() and any((tmp_path / "out").glob("*.eml"))


def test_the_demo_runs_whatever_the_environment_holds(tmp_path):
    """Not even an unusable setting stops it: it reads none."""
    env = runner_env("mysql://nowhere/db", ALERTS_SMTP_PORT="seventy", ALERTS_TELEGRAM_BOT_TOKEN="123:abc")
    first, again = run_demo(tmp_path, env), run_demo(tmp_path, env)

    assert (first.returncode, again.returncode) == (0, 0), first.stderr + again.stderr
    assert "alerts-demo.db" in first.stdout


def test_a_demo_database_that_cannot_be_opened_is_one_line_naming_the_option(tmp_path):
    result = run_demo(tmp_path, runner_env("sqlite:///unused.db"), "--db", str(tmp_path / "no" / "such" / "x.db"))

    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        f"Error: --db {tmp_path / 'no' / 'such' / 'x.db'}: cannot open the demo's database: unable to open database file"]
