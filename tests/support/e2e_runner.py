"""Helpers for the end-to-end, concurrency and dry-run tests: the real runner and the
`alerts` command as subprocesses pointed at the in-process fake SMTP server and provider
API over loopback, JSON Lines events, whole-database dumps and parsing what arrived."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from alerts.core.db import make_engine

ROOT = Path(__file__).resolve().parents[2]
# Generous for a subprocess on a busy 2-core machine; only bounds a hung run.
RUN_TIMEOUT_SECONDS = 120
FAKE_TIMEOUT_SECONDS = "5"
# Kept from the caller's environment: how this machine's PostgreSQL must be reached
# (.ci/run sets it to run tests behind PgBouncer; tests/conftest.py).
KEPT_VARIABLES = ("ALERTS_DB_PREPARED_STATEMENTS",)

_TEXT_EVENT_ID = re.compile(r"^#(\d+) · ", re.MULTILINE)  # the id line of an item in text/plain email
_TELEGRAM_EVENT_ID = re.compile(r"#(\d+) · \d\d:\d\d")  # "#<id> · HH:MM" in a Telegram digest item


def runner_env(db_url: str, smtp=None, api=None, **extra: str) -> dict:
    """The process environment for a run: this machine's, less any ALERTS_* or
    DATABASE_URL of the caller, with the database and the fakes that are given."""
    env = {k: v for k, v in os.environ.items()
           if k in KEPT_VARIABLES or not k.startswith(("ALERTS_", "DATABASE_URL"))}
    env["DATABASE_URL"] = db_url
    if smtp is not None:
        env.update(ALERTS_EMAIL_BACKEND="smtp", ALERTS_SMTP_HOST=smtp.host, ALERTS_SMTP_PORT=str(smtp.port),
                   ALERTS_SMTP_TLS="none", ALERTS_SMTP_TIMEOUT_SECONDS=FAKE_TIMEOUT_SECONDS)
    if api is not None:
        env.update(ALERTS_TELEGRAM_BOT_TOKEN=api.bot_token, ALERTS_TELEGRAM_API_BASE=api.telegram_api_base,
                   ALERTS_TWILIO_ACCOUNT_SID=api.twilio_sid, ALERTS_TWILIO_AUTH_TOKEN=api.twilio_token,
                   ALERTS_TWILIO_FROM="+15005550006", ALERTS_TWILIO_API_BASE=api.twilio_api_base,
                   ALERTS_HTTP_TIMEOUT_SECONDS=FAKE_TIMEOUT_SECONDS)
    env.update(extra)
    return env


def runner_args(phase: str, now: str | None = None, dry_run: bool = False) -> list[str]:
    args = [sys.executable, "-m", "alerts.runner", "--phase", phase, "--json"]
    if now:
        args += ["--now", now]
    if dry_run:
        args.append("--dry-run")
    return args


def run_phase(env: dict, phase: str, now: str | None = None, dry_run: bool = False) -> dict:
    """``python -m alerts.runner --phase PHASE --json``; its JSON, after checking exit 0."""
    result = subprocess.run(runner_args(phase, now, dry_run), env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def start_phase(env: dict, phase: str, now: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(runner_args(phase, now), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    """Wait for a started run; its JSON, after checking exit 0."""
    out, err = proc.communicate(timeout=RUN_TIMEOUT_SECONDS)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err}"
    return json.loads(out)


def ingest(env: dict, events: list[dict]) -> dict:
    """``alerts ingest - --json`` with one JSON Lines line per event."""
    lines = "".join(json.dumps(event) + "\n" for event in events)
    result = subprocess.run([sys.executable, "-m", "alerts", "ingest", "-", "--json"], env=env, cwd=ROOT,
                            input=lines, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def event(key: str, created_at: str, **cols) -> dict:
    """A producer's event as `alerts ingest` takes it."""
    return {"event_key": key, "alert_type": "pipeline_outage", "region": "NL", "severity": 3,
            "title": f"Outage {key}", "summary": "Flow reduced", "url": "https://energyriskiq.com/e/1",
            "created_at": created_at, **cols}


# --- the database as a whole ------------------------------------------------------------

def dump_database(url: str) -> dict[str, list]:
    """Every row of every table (alembic_version and SQLite's own bookkeeping included),
    in a stable order."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                names = conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").scalars().all()
            else:
                names = conn.exec_driver_sql(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
                ).scalars().all()
            dump = {}
            for name in names:
                result = conn.execute(sa.text(f'SELECT * FROM "{name}"'))
                dump[name] = sorted((tuple(row) for row in result), key=repr)
            return dump
    finally:
        engine.dispose()


# --- what arrived ---------------------------------------------------------------------------

def plain_part(mail) -> str:
    return mail.message.get_body(preferencelist=("plain",)).get_content()


def html_part(mail) -> str:
    return mail.message.get_body(preferencelist=("html",)).get_content()


def email_event_ids(mail) -> list[int]:
    """The `#<event id>` of every item in an email's text/plain part."""
    return [int(n) for n in _TEXT_EVENT_ID.findall(plain_part(mail))]


def telegram_event_ids(text: str) -> list[int]:
    return [int(n) for n in _TELEGRAM_EVENT_ID.findall(text)]
