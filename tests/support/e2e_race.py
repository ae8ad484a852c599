"""Processes for the Phase D / Phase C race test (tests/system/test_runner_concurrency.py).

    python -m tests.support.e2e_race loop --phase d --now ISO --stop FILE
        runs the real runner (alerts.runner.execute) again and again, printing each
        run's JSON on stdout, until FILE exists; ``--phase tasks`` sends due rows one
        by one as the Celery send tasks do;
    python -m tests.support.e2e_race send --now ISO --go FILE
        Phase C's send loop for instant deliveries WITHOUT the phase lock — as the
        Celery send tasks run — printing its counts as JSON; only the row claims keep
        concurrent senders apart. Says it is ready (FILE.ready.PID) and starts when FILE
        exists, so that all start together;
    python -m tests.support.e2e_race produce --batches N --size K --created-at ISO [ISO ...]
        ingests N batches of K events (alerts.phases.ingest, the code behind `alerts ingest`)
        and fans each batch out with Phases A and B under their locks. After half the
        batches it waits until some digest has been sent, so the second half arrives for
        windows whose digest has already left `queued`.

Both read DATABASE_URL and the other settings from the environment, like the runner.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from alerts.core import tables as m
from alerts.cli.run import execute
from alerts.core.clock import Clock, parse_instant
from alerts.core.settings import Settings
from alerts.core.db import Database, make_engine
from alerts.phases.pipeline import run_phases, session
from alerts.phases.ingest import ingest_lines

MAX_SECONDS = 90  # a loop or producer never outlives a stuck test
EXIT_TIMED_OUT = 4


def loop(phase: str, now: str, stop: Path) -> int:
    """``phase`` "tasks": instead of the runner, what the Celery send tasks do — one
    ``send_one`` per due row."""
    deadline = time.monotonic() + MAX_SECONDS
    run = _tasks_runner(now) if phase == "tasks" else lambda: execute(phase, now, dry_run=False, as_json=True)
    while not stop.exists():
        if time.monotonic() > deadline:
            return EXIT_TIMED_OUT
        run()
        sys.stdout.flush()
    return 0


def _tasks_runner(now: str):
    from alerts.channels.registry import build_channels
    from alerts.sending.outbox import OUTBOXES
    from alerts.sending.service import send_one

    settings = Settings.from_env()
    engine = make_engine(settings.database_url, prepared_statements=settings.db_prepared_statements)
    db, channels, clock = Database(engine), build_channels(settings), Clock(parse_instant(now))

    def run() -> None:
        counts = {}
        for outbox in OUTBOXES:
            table = outbox.table
            with engine.connect() as conn:
                due = conn.execute(sa.select(table.c.id).where(table.c.status == "queued", *outbox.due(clock.now()))
                                   .order_by(table.c.id)).scalars().all()
            outcomes = [send_one(db, outbox, row_id, clock, settings, channels).status for row_id in due]
            counts[outbox.name] = {"sent": outcomes.count("sent")}
        print(json.dumps({"c": counts}))

    return run


def send(now: str, go: Path) -> int:
    from alerts.sending.outbox import INSTANT
    from alerts.phases.send import send_due

    settings = Settings.from_env()
    engine = make_engine(settings.database_url, prepared_statements=settings.db_prepared_statements)
    deadline = time.monotonic() + MAX_SECONDS
    Path(f"{go}.ready.{os.getpid()}").touch()
    while not go.exists():
        if time.monotonic() > deadline:
            return EXIT_TIMED_OUT
        time.sleep(0.01)
    try:
        with session(engine, settings) as (db, channels):
            counts = send_due(db, INSTANT, Clock(parse_instant(now)), settings, channels)
    finally:
        engine.dispose()
    print(json.dumps(counts.as_dict()))
    return 0


def produce(batches: int, size: int, created_at: list[str]) -> int:
    settings = Settings.from_env()
    engine = make_engine(settings.database_url, prepared_statements=settings.db_prepared_statements)
    db = Database(engine)
    clock = Clock()
    try:
        for batch in range(batches):
            if batch == batches // 2 and not _wait_for_a_sent_digest(engine):
                return EXIT_TIMED_OUT
            lines = [json.dumps({"event_key": f"race-{batch}-{n}", "alert_type": "pipeline_outage",
                                 "region": "NL", "severity": 1 + (batch + n) % 5, "title": f"Race {batch}.{n}",
                                 "summary": "Flow reduced", "created_at": created_at[(batch + n) % len(created_at)]})
                     for n in range(size)]
            report = ingest_lines(db, lines)
            assert report.stored == size and not report.errors, report
            with session(engine, settings) as (run_db, channels):
                while True:  # a concurrent A/B run could hold a lock: try until ours are done
                    results = run_phases(run_db, ("a", "b"), clock, settings, channels)
                    if not any(r.get("locked") for r in results.values()):
                        break
            time.sleep(0.05)
        return 0
    finally:
        engine.dispose()


def _wait_for_a_sent_digest(engine) -> bool:
    g = m.user_alert_digests
    deadline = time.monotonic() + MAX_SECONDS / 2
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(sa.select(g.c.id).where(g.c.status == "sent").limit(1)).first():
                return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.e2e_race")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("loop")
    run.add_argument("--phase", required=True)
    run.add_argument("--now", required=True)
    run.add_argument("--stop", type=Path, required=True)
    unlocked = commands.add_parser("send")
    unlocked.add_argument("--now", required=True)
    unlocked.add_argument("--go", type=Path, required=True)
    make = commands.add_parser("produce")
    make.add_argument("--batches", type=int, required=True)
    make.add_argument("--size", type=int, required=True)
    make.add_argument("--created-at", nargs="+", required=True)
    args = parser.parse_args(argv)
    if args.command == "loop":
        return loop(args.phase, args.now, args.stop)
    if args.command == "send":
        return send(args.now, args.go)
    return produce(args.batches, args.size, args.created_at)


if __name__ == "__main__":
    sys.exit(main())
