"""Where a digest send's CPU goes, step by step, in one process: no Celery, no SMTP.

    python bench/bench_send_steps.py [--digests 2000] [--items 3] [--profile FILE]

Seeds ``--digests`` due daily email digests of ``--items`` events (as bench_celery.py
and bench_latency.py do), sends each through the send tasks' own path (``send_one``)
with an email channel that builds the message's bytes and stops short of SMTP, and reads
this process's CPU time (``time.process_time``) inside each step:

- claim: ``DIGESTS.claim``, the UPDATE that takes the row;
- load: ``DIGESTS.load`` less the rendering — the statement and its rows;
- render: ``render_digest`` (Jinja2), called by the load;
- mime: ``build_mime`` to bytes, what the email channel hands to smtplib;
- record: ``DIGESTS.record``, the UPDATE of the outcome;
- rest: the rest of ``send_one`` — the connections it takes from the pool for its
  statements (and whatever transactions it opens) and the send path's own bookkeeping.

It prints the milliseconds of CPU per digest of each step and their total, and
``python_speed_us`` (how fast the machine runs Python that hour). The latency
benchmark's workers spend more per digest: Celery's consumer loop, smtplib and the
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
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import alerts.sending.outbox  # noqa: E402
from alerts.channels import Channel  # noqa: E402
from alerts.channels.email import build_mime  # noqa: E402
from alerts.channels.registry import ChannelSet  # noqa: E402
from alerts.core.clock import Clock  # noqa: E402
from alerts.core.db import Database, make_engine  # noqa: E402
from alerts.sending.outbox import DIGESTS  # noqa: E402
from alerts.sending.service import send_one  # noqa: E402
from bench._common import create_database, drop_database, python_speed_us, smtp_settings, write_results  # noqa: E402
from bench.bench_celery import seed  # noqa: E402

STEPS = ("claim", "load", "render", "mime", "record", "rest")


class MimeOnlyEmail(Channel):
    """The email channel less its SMTP conversation: it builds the bytes smtplib is given."""

    name = "email"

    def __init__(self, sender: str):
        self.sender = sender

    def send(self, recipient, message) -> None:
        bytes(build_mime(message, self.sender, recipient))


def measure(url: str) -> tuple[dict[str, float], int]:
    """CPU seconds per step, summed over every due digest, and the count of digests sent."""
    settings = smtp_settings(url, 2525)
    db, clock = Database(make_engine(url)), Clock(None)
    channels = ChannelSet({"email": MimeOnlyEmail(settings.email_from)})
    spent = dict.fromkeys(STEPS, 0.0)

    def timed(step: str, function):
        def run(*args, **kwargs):
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[step] += time.process_time() - start
        return run

    with db.transaction() as conn:
        ids = conn.exec_driver_sql("SELECT id FROM user_alert_digests ORDER BY id").scalars().all()
    steps = [(DIGESTS, "claim"), (DIGESTS, "load"), (alerts.sending.outbox, "render_digest"),
             (MimeOnlyEmail, "send"), (DIGESTS, "record")]
    sent = 0
    with ExitStack() as patches:
        for (owner, attribute), step in zip(steps, STEPS):
            patches.enter_context(mock.patch.object(owner, attribute, timed(step, getattr(owner, attribute))))
        for row_id in ids:
            start = time.process_time()
            sent += send_one(db, DIGESTS, row_id, clock, settings, channels).status == "sent"
            spent["rest"] += time.process_time() - start
    db.engine.dispose()
    spent["load"] -= spent["render"]  # the load renders
    spent["rest"] -= sum(spent[step] for step in STEPS[:-1])
    return spent, sent


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
        spent, n = measure(url)
        if profile:
            profile.disable()
            profile.dump_stats(options.profile)
    finally:
        drop_database(url)
    if n != options.digests:
        raise SystemExit(f"sent {n} digests, expected {options.digests}")
    per_digest = {step: round(spent[step] / n * 1e3, 3) for step in STEPS}
    payload = {"digests": n, "items_per_digest": options.items, "python_speed_us": speed,
               "cpu_ms_per_digest": {**per_digest, "total": round(sum(spent.values()) / n * 1e3, 3)},
               "profiled": bool(options.profile)}
    print(json.dumps(payload, indent=2))
    write_results("send_steps", payload, python_speed_us=speed)


if __name__ == "__main__":
    main()
