"""A supersede racing the send of the row it supersedes (docs/policy.md), with real
processes on one PostgreSQL database: two senders without the phase lock (as the Celery
send tasks run) are sending the older deliveries of many stories while a Phase B runner
fans out a newer event of each story. For every story the older delivery ends either
sent (and the newer is sent too) or skipped as superseded by the newer (which is sent) —
never neither, never twice."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.clock import parse_instant
from alerts.core.db import make_engine
from tests.support.e2e_runner import ROOT, RUN_TIMEOUT_SECONDS, finish, run_phase, runner_env, start_phase
from tests.support.factories import add_delivery, add_event, add_pref, add_user, rows

NOW = "2026-05-12T12:00:00+00:00"
STORIES = 300
SENDERS = 2
START_AFTER_MAILS = 20  # Phase B starts once the senders are well under way


def seed(url: str) -> dict[int, tuple[int, int, str]]:
    """Per user: (older event, newer event, address). The older event's instant delivery
    is queued, as Phase B left it; the newer event is ready, with the same collapse_key."""
    now = parse_instant(NOW)
    engine = make_engine(url)
    stories = {}
    with engine.begin() as conn:
        for n in range(STORIES):
            address = f"story{n}@example.com"
            user = add_user(conn, email=address)
            add_pref(conn, user, alert_type=f"story_{n}")
            older = add_event(conn, status="fanned_out", alert_type=f"story_{n}", collapse_key=f"story-{n}",
                              created_at=now - timedelta(minutes=10))
            add_delivery(conn, user, older)
            newer = add_event(conn, status="ready", alert_type=f"story_{n}", collapse_key=f"story-{n}",
                              created_at=now - timedelta(minutes=5))
            stories[user] = (older, newer, address)
    engine.dispose()
    return stories


def delivery_of(mail) -> int:
    return int(re.fullmatch(r"<alert-delivery-(\d+)\.[0-9a-f]+@[^>]+>", mail.message["Message-ID"]).group(1))


def test_a_supersede_racing_the_send_of_the_older_row_leaves_one_or_both_sent_never_neither(
        pg_url, smtp_server, tmp_path):
    stories = seed(pg_url)
    env = runner_env(pg_url, smtp_server, ALERTS_SEND_BATCH_SIZE="5")
    smtp_server.data_delay = 0.02  # 300 older sends take 6 s or more: Phase B starts well inside them
    go = tmp_path / "go"
    senders = [subprocess.Popen([sys.executable, "-m", "tests.support.e2e_race", "send", "--now", NOW, "--go", str(go)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(SENDERS)]
    fan_out = None
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        while len(list(tmp_path.glob("go.ready.*"))) < SENDERS and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        while len(smtp_server.messages) < START_AFTER_MAILS and time.monotonic() < deadline:
            time.sleep(0.005)
        fan_out = start_phase(env, "b", NOW)
        assert finish(fan_out)["b"]["events_fanned_out"] == STORIES
        for sender in senders:
            finish(sender)
    finally:
        for proc in [*senders, fan_out]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=RUN_TIMEOUT_SECONDS)
    smtp_server.data_delay = 0
    run_phase(env, "c", NOW)  # whatever the senders had not reached

    engine = make_engine(pg_url)
    with engine.connect() as conn:
        found = {(d["user_id"], d["alert_event_id"]): d for d in rows(conn, m.user_alert_deliveries)}
        left = conn.execute(sa.select(sa.func.count()).select_from(m.user_alert_deliveries)
                            .where(m.user_alert_deliveries.c.status.in_(("queued", "sending")))).scalar_one()
    engine.dispose()
    mails = Counter(delivery_of(mail) for mail in smtp_server.messages)
    assert set(mails.values()) == {1}, "nothing is sent twice"
    assert left == 0
    outcomes = Counter()
    for user, (older, newer, address) in stories.items():
        old, new = found[(user, older)], found[(user, newer)]
        assert new["status"] == "sent" and mails[new["id"]] == 1, (user, new)
        if old["status"] == "sent":
            assert mails[old["id"]] == 1
            outcomes["both sent"] += 1
        else:
            assert (old["status"], old["last_error"]) == ("skipped", f"superseded by #{newer}"), (user, old)
            assert mails[old["id"]] == 0
            outcomes["older superseded"] += 1
    assert outcomes["both sent"] >= START_AFTER_MAILS and outcomes["older superseded"] > 0, \
        f"the race really happened both ways: {dict(outcomes)}"
