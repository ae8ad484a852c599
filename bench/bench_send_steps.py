"""Where a digest send's CPU goes, step by step, in one process: no Celery, no SMTP.

    python bench/bench_send_steps.py [--digests 2000] [--items 3] [--profile FILE]

Seeds ``--digests`` due daily email digests of ``--items`` events (as bench_celery.py
and bench_latency.py do), then sends each as a send task does, with the outbox's own
operations, and reads this process's CPU time (``time.process_time``) around each step:

1. claim: ``DIGESTS.claim`` for the one row, in the claim-and-load transaction (its
   BEGIN and the pool checkout with its pre-ping counted here);
2. load: ``DIGESTS.load`` less the rendering — the statement and its rows;
3. render: ``render_digest`` (Jinja2), timed inside the load;
4. mime: ``build_mime`` to bytes, what the email channel hands to smtplib;
5. record: ``DIGESTS.record`` of a sent outcome, in a transaction of its own.

It prints the milliseconds of CPU per digest of each step and their total, and
``python_speed_us`` (how fast the machine runs Python that hour). The latency benchmark's
workers spend about twice the total per digest: Celery's consumer loop, smtplib and the
waits for the GIL come on top. ``--profile FILE`` writes a cProfile (CPU time) of the run.

Needs PostgreSQL (ALERTS_BENCH_PG_ADMIN_URL, default postgresql://postgres@127.0.0.1/postgres);
creates a throwaway database and drops it at the end.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import alerts.outbox  # noqa: E402
from alerts import retry  # noqa: E402
from alerts.channels.email import build_mime  # noqa: E402
from alerts.channels.registry import build_channels  # noqa: E402
from alerts.clock import Clock  # noqa: E402
from alerts.db import Database, make_engine  # noqa: E402
from alerts.outbox import DIGESTS  # noqa: E402
from bench._common import create_database, drop_database, python_speed_us, smtp_settings  # noqa: E402
from bench.bench_celery import seed  # noqa: E402

STEPS = ("claim", "load", "render", "mime", "record")


def measure(url: str) -> dict[str, float]:
    """CPU seconds per step, summed over every due digest, and the count of digests."""
    settings = smtp_settings(url, 2525)  # nothing connects: no send is made
    channels, db, clock = build_channels(settings), Database(make_engine(url)), Clock(None)
    spent = dict.fromkeys(STEPS, 0.0)
    render = alerts.outbox.render_digest

    def timed_render(*args, **kwargs):
        start = time.process_time()
        try:
            return render(*args, **kwargs)
        finally:
            spent["render"] += time.process_time() - start

    with db.transaction() as conn:
        ids = conn.exec_driver_sql("SELECT id FROM user_alert_digests ORDER BY id").scalars().all()
    alerts.outbox.render_digest = timed_render
    try:
        for row_id in ids:
            t0 = time.process_time()
            with db.transaction() as conn:
                claimed = DIGESTS.claim(conn, clock.now(), 1, row_id=row_id)
                t1 = time.process_time()
                (job,) = DIGESTS.load(conn, claimed, settings, channels)
            t2 = time.process_time()
            bytes(build_mime(job.message, settings.email_from, job.recipient))
            t3 = time.process_time()
            with db.transaction() as conn:
                assert DIGESTS.record(conn, job, retry.sent(clock.now()))
            t4 = time.process_time()
            spent["claim"] += t1 - t0
            spent["load"] += t2 - t1
            spent["mime"] += t3 - t2
            spent["record"] += t4 - t3
    finally:
        alerts.outbox.render_digest = render
        db.engine.dispose()
    spent["load"] -= spent["render"]
    return {**spent, "digests": len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digests", type=int, default=2000)
    parser.add_argument("--items", type=int, default=3, help="events per digest")
    parser.add_argument("--profile", help="write a cProfile (CPU time) of the run here")
    options = parser.parse_args()
    speed = python_speed_us()
    url = create_database("alerts_bench_steps")
    try:
        seed(url, options.digests, options.items)
        profile = cProfile.Profile(time.process_time) if options.profile else None
        if profile:
            profile.enable()
        spent = measure(url)
        if profile:
            profile.disable()
            profile.dump_stats(options.profile)
    finally:
        drop_database(url)
    n = spent.pop("digests")
    if n != options.digests:
        raise SystemExit(f"sent {n} digests, expected {options.digests}")
    per_digest = {step: round(spent[step] / n * 1e3, 3) for step in STEPS}
    print(json.dumps({"digests": n, "items_per_digest": options.items, "python_speed_us": speed,
                      "cpu_ms_per_digest": {**per_digest, "total": round(sum(spent.values()) / n * 1e3, 3)},
                      "profiled": bool(options.profile)}, indent=2))


if __name__ == "__main__":
    main()
