"""The Celery tasks, run in this process against real PostgreSQL, the test SMTP server,
the fake Telegram API and a real Redis broker (the session's own, flushed per test).

Tasks run with ``task.apply()``; the send tasks they enqueue are really published, and
``drain`` plays the worker: it pops them from Redis and applies them here.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fakeredis
import pytest
import redis
import sqlalchemy as sa
from celery.signals import before_task_publish, task_retry

from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.core.db import make_engine
from alerts.sending.ratelimit import TelegramLimiter
from alerts.celery.worker import state as worker
from tests.support.factories import WINDOW_END, WINDOW_START, add_delivery, add_digest, add_event, add_pref, add_user
from tests.support.fakes.fixtures import with_fakes

ROOT = Path(__file__).resolve().parents[3]
SEND_QUEUE, PHASE_QUEUE = "alerts.send", "alerts"
STABLE_TASK_NAMES = {"alerts.intake", "alerts.fanout", "alerts.build_digests", "alerts.dispatch_deliveries",
              "alerts.send_digest", "alerts.send_delivery", "alerts.recover_stale", "alerts.run_pipeline",
              "alerts.ingest_event"}

AFTER_WINDOW = WINDOW_END + timedelta(minutes=1)


# --- fixtures and helpers -----------------------------------------------------------------

@pytest.fixture(scope="session")
def broker_url(redis_server):
    return redis_server.url(10)


@pytest.fixture(scope="session")
def celery_app(broker_url):
    import celery_app as module

    # Before anything opens a broker connection: publish to the test Redis.
    module.app.conf.broker_url = broker_url
    module.app.conf.task_always_eager = False
    module.app.loader.import_default_modules()  # registers alerts.celery.tasks
    return module.app


@pytest.fixture
def broker(broker_url):
    client = redis.Redis.from_url(broker_url)
    client.flushdb()
    yield client
    client.flushdb()


class Clock:
    def __init__(self):
        self.ms = 1_800_000_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def app(celery_app, broker, pg_url, smtp_server, provider_api, clock, tmp_path):
    settings = with_fakes(Settings.from_env({"DATABASE_URL": pg_url, "ALERTS_OUTBOX_DIR": str(tmp_path),
                                             "CELERY_BROKER_URL": celery_app.conf.broker_url}),
                          smtp_server, provider_api)
    worker.configure(settings, limiter=TelegramLimiter(fakeredis.FakeRedis(), clock_ms=clock))
    yield celery_app
    worker.configure(None)


def published(broker, queue: str = SEND_QUEUE) -> list[dict]:
    """The task messages waiting in a Redis queue, oldest first."""
    out = []
    for raw in reversed(broker.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "args": args, "kwargs": kwargs,
                    "eta": message["headers"].get("eta")})
    return out


def drain(app, broker, queue: str = SEND_QUEUE, limit: int = 10_000) -> list:
    """Be the worker: run every waiting task here, including those they enqueue."""
    results = []
    while len(results) < limit and (raw := broker.rpop(queue)) is not None:
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        results.append(app.tasks[message["headers"]["task"]].apply(args, kwargs).get())
    return results


@contextmanager
def receiving(signal):
    """The keyword arguments of every ``signal`` sent inside the block."""
    seen = []

    def receiver(sender=None, **kwargs):
        seen.append(kwargs)

    signal.connect(receiver, weak=False)
    try:
        yield seen
    finally:
        signal.disconnect(receiver)


def iso(at: datetime) -> str:
    return at.isoformat()


def add_many_due_digests(conn, count: int) -> None:
    """``count`` users with one due digest each, set-based (a backlog)."""
    conn.execute(sa.text(
        "INSERT INTO users (email) SELECT 'bulk' || n || '@example.com' FROM generate_series(1, :n) n"), {"n": count})
    conn.execute(sa.insert(m.user_alert_digests).from_select(
        ["user_id", "channel", "period", "window_start", "window_end", "digest_key", "status", "next_retry_at"],
        sa.select(m.users.c.id, sa.literal("email"), sa.literal("daily"),
                  sa.literal(WINDOW_START, m.UTCDateTime()), sa.literal(WINDOW_END, m.UTCDateTime()),
                  sa.literal("bulk:") + sa.cast(m.users.c.id, sa.Text), sa.literal("queued"),
                  sa.literal(WINDOW_END, m.UTCDateTime()))))


def row(conn, table, row_id: int):
    return conn.execute(sa.select(table).where(table.c.id == row_id)).one()._mapping


def digest_ids_published(broker) -> list[int]:
    return [msg["args"][0] for msg in published(broker) if msg["task"] == "alerts.send_digest"]


# --- the application ------------------------------------------------------------------------

def test_every_spec_task_name_is_registered(celery_app):
    celery_app.loader.import_default_modules()
    assert STABLE_TASK_NAMES <= set(celery_app.tasks)


def test_the_app_speaks_json_only_acks_late_and_keeps_no_results(celery_app):
    conf = celery_app.conf
    assert (conf.task_serializer, conf.result_serializer, conf.accept_content) == ("json", "json", ["json"])
    assert conf.task_ignore_result and conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.timezone == Settings.from_env().timezone  # ALERTS_TIMEZONE


def test_the_visibility_timeout_is_set_everywhere_and_outlasts_every_countdown(celery_app):
    conf = celery_app.conf
    visibility = conf.visibility_timeout
    assert conf.broker_transport_options["visibility_timeout"] == visibility
    assert conf.result_backend_transport_options["visibility_timeout"] == visibility
    from alerts.core.settings import MAX_COUNTDOWN_SECONDS

    for name in STABLE_TASK_NAMES:
        task = celery_app.tasks[name]
        assert task.max_retries <= 10 and task.retry_jitter
        # the longest autoretry countdown is retry_backoff_max; the rate limiter's is capped
        assert task.retry_backoff_max * 10 <= visibility
    assert MAX_COUNTDOWN_SECONDS * 10 <= visibility


def test_send_tasks_have_a_queue_of_their_own(celery_app):
    route = celery_app.amqp.router.route
    assert route({}, "alerts.send_digest")["queue"].name == SEND_QUEUE
    assert route({}, "alerts.send_delivery")["queue"].name == SEND_QUEUE
    assert route({}, "alerts.build_digests")["queue"].name == PHASE_QUEUE


@pytest.mark.parametrize("variable, value", [
    ("ALERTS_TIMEZONE", "Mars/Olympus_Mons"),
    ("ALERTS_BEAT_DIGEST_SECONDS", "soon"),
    ("ALERTS_BEAT_DISPATCH_SECONDS", "0"),
    ("ALERTS_CELERY_VISIBILITY_TIMEOUT_SECONDS", "30"),
    ("ALERTS_REENQUEUE_AFTER_SECONDS", "-1"),
    ("ALERTS_RATELIMIT_REDIS_URL", "http://127.0.0.1:6379"),
    ("ALERTS_MAX_ATTEMPTS", "five"),
])
def test_a_bad_setting_stops_the_app_with_exit_2_naming_the_variable(variable, value):
    result = subprocess.run([sys.executable, "-c", "import celery_app"], cwd=ROOT, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", variable: value}, timeout=60)
    assert result.returncode == 2
    assert variable in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("variable, entry, task", [
    ("ALERTS_BEAT_INTAKE_SECONDS", "intake-and-fanout", "alerts.run_pipeline"),
    ("ALERTS_BEAT_DIGEST_SECONDS", "build-digests", "alerts.build_digests"),
    ("ALERTS_BEAT_DISPATCH_SECONDS", "dispatch-deliveries", "alerts.dispatch_deliveries"),
    ("ALERTS_BEAT_RECOVER_SECONDS", "recover-stale", "alerts.recover_stale"),
])
def test_each_beat_interval_comes_from_its_variable(variable, entry, task):
    import beat_schedule

    schedule = beat_schedule.build(Settings.from_env({variable: "7"}))
    assert schedule[entry]["task"] == task
    assert schedule[entry]["schedule"] == 7
    assert schedule[entry]["options"]["expires"] == 7  # no pile-up while workers are down
    assert beat_schedule.build(Settings.from_env({}))[entry]["schedule"] != 7


@pytest.mark.parametrize("text, expected", [
    ("2026-05-13T00:01:00+00:00", datetime(2026, 5, 13, 0, 1, tzinfo=timezone.utc)),
    ("2026-05-13T00:01:00Z", datetime(2026, 5, 13, 0, 1, tzinfo=timezone.utc)),
    ("2026-05-13T02:01:00+02:00", datetime(2026, 5, 13, 0, 1, tzinfo=timezone.utc)),
])
def test_a_tasks_clock_starts_at_its_now_given_as_an_iso_instant_with_an_offset(text, expected):
    from alerts.celery.tasks import clock_for

    assert clock_for(text).start == expected


@pytest.mark.parametrize("text", ["2026-05-13T00:01:00", "tomorrow"])
def test_a_now_without_an_offset_is_refused(text):
    from alerts.celery.tasks import clock_for

    with pytest.raises(ValueError):
        clock_for(text)


# --- phases -------------------------------------------------------------------------------

def test_run_pipeline_runs_every_phase_in_one_task(app, conn, smtp_server):
    instant_user, digest_user = add_user(conn), add_user(conn)
    add_pref(conn, instant_user)
    add_pref(conn, digest_user, delivery_kind="digest")
    add_event(conn, created_at=WINDOW_START + timedelta(hours=10))

    result = app.tasks["alerts.run_pipeline"].apply(kwargs={"now": iso(AFTER_WINDOW)}).get()

    assert list(result) == ["a", "b", "d", "c"]
    assert result["c"]["instant"]["sent"] == 1 and result["c"]["digests"]["sent"] == 1
    assert len(smtp_server.messages) == 2


def test_intake_and_fanout_are_tasks_of_their_own(app, conn):
    add_pref(conn, add_user(conn))
    add_event(conn)
    add_event(conn, title=" ")

    assert app.tasks["alerts.intake"].apply().get() == {"accepted": 1, "rejected": 1}
    assert app.tasks["alerts.fanout"].apply().get() == {"events_fanned_out": 1, "deliveries_created": 1}


def test_build_digests_enqueues_one_send_per_due_digest(app, conn, broker):
    for _ in range(3):
        user = add_user(conn)
        add_pref(conn, user, delivery_kind="digest")
    add_event(conn, created_at=WINDOW_START + timedelta(hours=3))
    add_event(conn, created_at=WINDOW_START + timedelta(hours=4))
    app.tasks["alerts.run_pipeline"].apply(kwargs={"phases": "ab"}).get()

    result = app.tasks["alerts.build_digests"].apply(kwargs={"now": iso(AFTER_WINDOW)}).get()

    assert result["d"]["digests_created"] == 3 and result["enqueued"] == 3
    digests = conn.execute(sa.select(m.user_alert_digests.c.id)).scalars().all()
    assert sorted(digest_ids_published(broker)) == sorted(digests)
    handed_on = {datetime.fromisoformat(msg["kwargs"]["now"]) for msg in published(broker)}
    assert len(handed_on) == 1 and AFTER_WINDOW <= handed_on.pop() < AFTER_WINDOW + timedelta(seconds=5)


def test_a_digest_is_not_enqueued_before_its_window_closes(app, conn, broker):
    add_digest(conn, add_user(conn))

    result = app.tasks["alerts.build_digests"].apply(kwargs={"now": iso(WINDOW_END - timedelta(minutes=1))}).get()

    assert result["enqueued"] == 0 and published(broker) == []


def test_send_tasks_are_published_only_after_their_rows_are_committed(app, conn, pg_url):
    add_digest(conn, add_user(conn))
    seen_by_another_connection = []
    other = make_engine(pg_url)

    def look(sender=None, body=None, **_):
        with other.connect() as c:
            seen_by_another_connection.append(c.execute(
                sa.select(m.user_alert_digests.c.enqueued_at).where(m.user_alert_digests.c.id == body[0][0])
            ).scalar_one())

    before_task_publish.connect(look, weak=False)
    try:
        app.tasks["alerts.build_digests"].apply(kwargs={"now": iso(AFTER_WINDOW)}).get()
    finally:
        before_task_publish.disconnect(look)
        other.dispose()
    (mark,) = seen_by_another_connection  # the task's clock starts at its `now` and runs on
    assert AFTER_WINDOW <= mark < AFTER_WINDOW + timedelta(seconds=5)


def test_a_backlog_is_enqueued_once_not_on_every_beat_tick(app, conn, broker):
    add_many_due_digests(conn, 4500)  # more than two chunks
    build = app.tasks["alerts.build_digests"]

    first = build.apply(kwargs={"now": iso(AFTER_WINDOW)}).get()["enqueued"]
    later_ticks = [build.apply(kwargs={"now": iso(AFTER_WINDOW + timedelta(minutes=n))}).get()["enqueued"]
                   for n in (1, 5, 9)]

    assert first == 4500 and later_ticks == [0, 0, 0]
    ids = digest_ids_published(broker)
    assert len(ids) == len(set(ids)) == 4500


def test_rows_whose_tasks_were_lost_are_enqueued_again_after_the_reenqueue_interval(app, conn, broker):
    add_many_due_digests(conn, 5)
    build = app.tasks["alerts.build_digests"]
    build.apply(kwargs={"now": iso(AFTER_WINDOW)}).get()
    broker.flushdb()  # the broker lost its queue

    late = AFTER_WINDOW + timedelta(seconds=worker.settings.reenqueue_after_seconds + 1)
    assert build.apply(kwargs={"now": iso(late)}).get()["enqueued"] == 5
    assert len(digest_ids_published(broker)) == 5


def test_a_backlog_still_waiting_in_the_queue_is_not_enqueued_again(app, conn, broker):
    add_many_due_digests(conn, 5)
    build = app.tasks["alerts.build_digests"]
    build.apply(kwargs={"now": iso(AFTER_WINDOW)}).get()

    interval, visibility = worker.settings.reenqueue_after_seconds, worker.settings.celery_visibility_timeout_seconds
    late = build.apply(kwargs={"now": iso(AFTER_WINDOW + timedelta(seconds=interval))}).get()
    very_late = build.apply(kwargs={"now": iso(AFTER_WINDOW + timedelta(seconds=visibility + 1))}).get()

    assert (late["enqueued"], very_late["enqueued"]) == (0, 5)  # by then Redis redelivers anyway


def test_two_dispatchers_at_once_enqueue_each_row_once(app, conn, broker):
    add_many_due_digests(conn, 3000)
    results = []

    def dispatch():
        results.append(app.tasks["alerts.build_digests"].apply(kwargs={"now": iso(AFTER_WINDOW)}).get())

    threads = [threading.Thread(target=dispatch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(r["enqueued"] for r in results) == 3000
    ids = digest_ids_published(broker)
    assert len(ids) == len(set(ids)) == 3000


def test_dispatch_deliveries_enqueues_due_instant_deliveries_only(app, conn, broker):
    user = add_user(conn)
    due = add_delivery(conn, user, add_event(conn, status="fanned_out"))
    add_delivery(conn, user, add_event(conn, status="fanned_out"), next_retry_at=AFTER_WINDOW + timedelta(hours=1))
    add_delivery(conn, user, add_event(conn, status="fanned_out"), delivery_kind="digest")
    add_delivery(conn, user, add_event(conn, status="fanned_out"), status="sent")

    result = app.tasks["alerts.dispatch_deliveries"].apply(kwargs={"now": iso(AFTER_WINDOW)}).get()

    assert result == {"enqueued": 1}
    assert [(msg["task"], msg["args"]) for msg in published(broker)] == [("alerts.send_delivery", [due])]


# --- sends --------------------------------------------------------------------------------

def test_a_digest_task_delivered_three_times_sends_one_message(app, conn, smtp_server):
    digest = add_digest(conn, add_user(conn), events=3)
    send = app.tasks["alerts.send_digest"]

    outcomes = [send.apply((digest,), {"now": iso(AFTER_WINDOW)}).get() for _ in range(3)]

    assert outcomes == ["sent", None, None]
    assert len(smtp_server.messages) == 1
    sent = row(conn, m.user_alert_digests, digest)
    assert (sent["status"], sent["attempts"]) == ("sent", 1)


def test_enqueued_digests_are_sent_by_the_send_tasks(app, conn, broker, smtp_server):
    for _ in range(4):
        add_digest(conn, add_user(conn))
    app.tasks["alerts.build_digests"].apply(kwargs={"now": iso(AFTER_WINDOW)}).get()

    assert drain(app, broker) == ["sent"] * 4
    assert len({mail.message["Message-ID"] for mail in smtp_server.messages}) == 4


def test_send_delivery_sends_one_instant_email(app, conn, smtp_server):
    delivery = add_delivery(conn, add_user(conn, email="ops@example.com"), add_event(conn, status="fanned_out"))

    assert app.tasks["alerts.send_delivery"].apply((delivery,)).get() == "sent"
    assert smtp_server.messages[0].rcpt_tos == ["ops@example.com"]
    assert row(conn, m.user_alert_deliveries, delivery)["status"] == "sent"


def test_a_transient_smtp_failure_is_recorded_on_the_row_and_enqueued_again_when_due(app, conn, broker, smtp_server):
    digest = add_digest(conn, add_user(conn))
    smtp_server.fail_data(times=1)
    with receiving(task_retry) as retried:
        outcome = app.tasks["alerts.send_digest"].apply((digest,), {"now": iso(AFTER_WINDOW)}).get()

    assert outcome == "queued" and retried == []  # the row's retry, not Celery's
    failed_once = row(conn, m.user_alert_digests, digest)
    assert failed_once["attempts"] == 1 and failed_once["next_retry_at"] > AFTER_WINDOW
    build = app.tasks["alerts.build_digests"]
    assert build.apply(kwargs={"now": iso(failed_once["next_retry_at"] - timedelta(seconds=1))}).get()["enqueued"] == 0
    assert build.apply(kwargs={"now": iso(failed_once["next_retry_at"])}).get()["enqueued"] == 1
    assert drain(app, broker) == ["sent"]


def test_an_unreachable_database_is_retried_by_celery_a_bounded_number_of_times(app, tmp_path):
    worker.configure(Settings.from_env({"DATABASE_URL": "postgresql://postgres@127.0.0.1:9/nowhere",
                                        "ALERTS_OUTBOX_DIR": str(tmp_path)}))
    with receiving(task_retry) as retried:
        result = app.tasks["alerts.send_digest"].apply((1,))

    assert result.failed() and isinstance(result.result, sa.exc.OperationalError)
    assert len(retried) == app.tasks["alerts.send_digest"].max_retries


def test_a_telegram_send_that_must_wait_is_put_back_before_its_claim(app, conn, broker, clock, provider_api):
    user = add_user(conn, telegram_chat_id="42")
    first, second = (add_delivery(conn, user, add_event(conn, status="fanned_out"), channel="telegram")
                     for _ in range(2))
    send = app.tasks["alerts.send_delivery"]

    assert send.apply((first,)).get() == "sent"
    assert send.apply((second,)).get() == "rate_limited"

    waiting = row(conn, m.user_alert_deliveries, second)
    assert (waiting["status"], waiting["attempts"]) == ("queued", 0)
    (again,) = published(broker)
    # It booked the chat's next second: woken then, it sends without a stampede.
    assert (again["task"], again["args"], again["kwargs"]) == ("alerts.send_delivery", [second], {"slot": "chat"})
    eta = datetime.fromisoformat(again["eta"])
    assert timedelta(0) < eta - datetime.now(timezone.utc) <= timedelta(seconds=1)

    clock.ms += 1000
    assert drain(app, broker) == ["sent"]
    assert [msg.chat_id for msg in provider_api.telegram_messages] == ["42", "42"]


def test_tasks_waiting_for_one_chat_wake_one_per_second_not_all_at_once(app, conn, broker, clock, provider_api):
    user = add_user(conn, telegram_chat_id="42")
    deliveries = [add_delivery(conn, user, add_event(conn, status="fanned_out"), channel="telegram")
                  for _ in range(4)]
    send = app.tasks["alerts.send_delivery"]

    assert [send.apply((d,)).get() for d in deliveries] == ["sent", "rate_limited", "rate_limited", "rate_limited"]
    etas = sorted(datetime.fromisoformat(msg["eta"]) for msg in published(broker))
    gaps = [later - earlier for earlier, later in zip(etas, etas[1:])]
    assert all(timedelta(milliseconds=900) <= gap <= timedelta(milliseconds=1100) for gap in gaps), gaps

    for _ in range(3):  # each second, exactly the task that booked it sends
        clock.ms += 1000
        message = broker.rpop(SEND_QUEUE)
        body = json.loads(base64.b64decode(json.loads(message)["body"]))
        assert send.apply(body[0], body[1]).get() == "sent"
    assert [msg.chat_id for msg in provider_api.telegram_messages] == ["42"] * 4
    assert published(broker) == []


def test_a_rate_limited_task_keeps_its_row_from_being_enqueued_again_while_it_waits(app, conn, broker, clock,
                                                                                    provider_api):
    """Its row is marked for when the task will run: a dispatch tick meanwhile — even one
    past the re-enqueue interval, counted from the first mark — publishes no second task
    (it would book, and waste, a slot of its own; found by the soak)."""
    user = add_user(conn, telegram_chat_id="42")
    deliveries = [add_delivery(conn, user, add_event(conn, status="fanned_out"), channel="telegram")
                  for _ in range(3)]
    dispatch_task, send = app.tasks["alerts.dispatch_deliveries"], app.tasks["alerts.send_delivery"]
    start = datetime.now(timezone.utc)
    assert dispatch_task.apply(kwargs={"now": iso(start)}).get() == {"enqueued": 3}
    assert drain(app, broker, limit=3) == ["sent", "rate_limited", "rate_limited"]
    assert len(published(broker)) == 2
    # A worker holds waiting (ETA) tasks itself: the queue looks empty meanwhile.
    held = [broker.rpop(SEND_QUEUE) for _ in range(2)]

    after = start + timedelta(seconds=worker.settings.reenqueue_after_seconds)
    assert dispatch_task.apply(kwargs={"now": iso(after)}).get() == {"enqueued": 0}
    assert published(broker) == [] and all(held)


def test_a_rate_limited_task_for_a_row_already_sent_does_nothing(app, conn, broker, clock, provider_api):
    user = add_user(conn, telegram_chat_id="42")
    delivery = add_delivery(conn, user, add_event(conn, status="fanned_out"), channel="telegram")
    send = app.tasks["alerts.send_delivery"]
    assert send.apply((delivery,)).get() == "sent"

    assert send.apply((delivery,)).get() is None  # not due: asks no rate limit, publishes nothing
    assert published(broker) == []


def test_a_send_task_that_finds_its_row_locked_looks_again_within_seconds(app, conn, broker, pg_url, smtp_server):
    """Another transaction (a Phase D, an unsubscribe) holds the due row: the claim skips
    it, and the task, instead of leaving the row to the re-enqueue age (ten minutes),
    looks again a second later — and sends once the lock is gone."""
    digest = add_digest(conn, add_user(conn))
    send = app.tasks["alerts.send_digest"]
    other = make_engine(pg_url)
    try:
        with other.begin() as holder:
            g = m.user_alert_digests
            holder.execute(sa.select(g.c.id).where(g.c.id == digest).with_for_update())
            assert send.apply((digest,), {"now": iso(AFTER_WINDOW)}).get() == "locked"
    finally:
        other.dispose()

    (again,) = published(broker)
    assert (again["task"], again["args"], again["kwargs"]) == \
        ("alerts.send_digest", [digest], {"now": iso(AFTER_WINDOW), "locked": 1})
    assert datetime.fromisoformat(again["eta"]) - datetime.now(timezone.utc) <= timedelta(seconds=1)
    assert drain(app, broker) == ["sent"]
    assert len(smtp_server.messages) == 1


def test_a_send_task_for_a_row_not_due_does_not_look_again(app, conn, broker, smtp_server):
    digest = add_digest(conn, add_user(conn), status="sent")

    assert app.tasks["alerts.send_digest"].apply((digest,), {"now": iso(AFTER_WINDOW)}).get() is None
    assert published(broker) == []


def test_recover_stale_requeues_an_abandoned_send_and_enqueues_it(app, conn, broker, smtp_server):
    digest = add_digest(conn, add_user(conn), status="sending", attempts=1, claimed_at=AFTER_WINDOW)
    lease = worker.settings.sending_lease_seconds
    later = AFTER_WINDOW + timedelta(seconds=lease + 1)

    result = app.tasks["alerts.recover_stale"].apply(kwargs={"now": iso(later)}).get()

    assert result["recovered"]["digests"] == 1 and result["enqueued"]["digests"] == 1
    assert drain(app, broker) == ["sent"]
    sent = row(conn, m.user_alert_digests, digest)
    assert (sent["status"], sent["attempts"]) == ("sent", 2)


# --- the send path: claims and outcomes -----------------------------------------------

def terminate_other_sessions(conn) -> None:
    """End every other session of the database, and wait (up to 5 s each) until each
    server process has gone: the connections are closed when this returns."""
    conn.execute(sa.text("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()"))


def test_a_connection_the_server_dropped_between_tasks_is_replaced_without_a_task_retry(app, conn, smtp_server):
    user = add_user(conn)
    first, second = (add_delivery(conn, user, add_event(conn, status="fanned_out")) for _ in range(2))
    send = app.tasks["alerts.send_delivery"]
    assert send.apply((first,)).get() == "sent"
    terminate_other_sessions(conn)

    with receiving(task_retry) as retried:
        assert send.apply((second,)).get() == "sent"

    assert retried == []
    assert len(smtp_server.messages) == 2
    assert row(conn, m.user_alert_deliveries, second)["attempts"] == 1


class TerminatingChannel:
    """The real email channel; the database drops every other session once the provider
    has accepted the message."""

    name = "email"

    def __init__(self, inner, conn):
        self.inner, self.conn = inner, conn

    def send(self, recipient, message):
        self.inner.send(recipient, message)
        terminate_other_sessions(self.conn)

    def close(self):
        self.inner.close()


def test_a_send_whose_database_connection_drops_right_after_the_provider_accepted_is_recorded_once(
        app, conn, smtp_server, monkeypatch):
    """A lost outcome would leave the row in ``sending``: sent again after the lease."""
    from alerts.channels.email import SmtpEmailChannel
    from alerts.channels.registry import ChannelSet

    digest = add_digest(conn, add_user(conn))
    worker.db()  # the worker's engine, with pooled connections the database will drop
    channels = ChannelSet({"email": TerminatingChannel(SmtpEmailChannel(worker.settings), conn)})
    monkeypatch.setattr(worker, "channels", lambda: channels)
    send = app.tasks["alerts.send_digest"]
    try:
        with receiving(task_retry) as retried:
            assert send.apply((digest,), {"now": iso(AFTER_WINDOW)}).get() == "sent"
        # a redelivered task, and a recovery long after the lease, send nothing more
        assert send.apply((digest,), {"now": iso(AFTER_WINDOW)}).get() is None
        later = AFTER_WINDOW + timedelta(seconds=worker.settings.sending_lease_seconds + 1)
        assert app.tasks["alerts.recover_stale"].apply(kwargs={"now": iso(later)}).get()["recovered"] == {
            "instant": 0, "digests": 0}
    finally:
        channels.close()

    assert retried == []
    assert (row(conn, m.user_alert_digests, digest)["status"], row(conn, m.user_alert_digests, digest)["attempts"]) \
        == ("sent", 1)
    assert len(smtp_server.messages) == 1


def test_a_message_that_cannot_be_rendered_fails_its_row_with_an_internal_error(app, conn, smtp_server, monkeypatch):
    import alerts.sending.outbox

    digest = add_digest(conn, add_user(conn))
    send = app.tasks["alerts.send_digest"]

    def broken(*args, **kwargs):
        raise RuntimeError("template bug")

    with monkeypatch.context() as patched:
        patched.setattr(alerts.sending.outbox, "render_digest", broken)
        assert send.apply((digest,), {"now": iso(AFTER_WINDOW)}).get() == "failed"
    failed = row(conn, m.user_alert_digests, digest)
    assert (failed["status"], failed["attempts"], failed["claimed_at"]) == ("failed", 1, None)
    assert failed["last_error"] == "internal error: RuntimeError"
    assert smtp_server.messages == []


class WatchingChannel:
    """The real email channel; before each send it notes what another connection sees
    of every delivery's status."""

    name = "email"

    def __init__(self, inner, engine):
        self.inner, self.engine, self.seen = inner, engine, []

    def send(self, recipient, message):
        table = m.user_alert_deliveries
        with self.engine.connect() as other:
            self.seen.append(dict(other.execute(sa.select(table.c.id, table.c.status).order_by(table.c.id)).all()))
        self.inner.send(recipient, message)

    def close(self):
        self.inner.close()


def test_phase_c_commits_each_claim_before_its_send_and_each_outcome_before_the_next_send(
        db_url, settings, smtp_server):
    """So a crash at any moment leaves at most the one send in flight unrecorded (the
    window docs/architecture.md allows), never a row whose outcome was known."""
    from alerts.channels.email import SmtpEmailChannel
    from alerts.channels.registry import ChannelSet
    from alerts.core.db import Database
    from alerts.phases.send import run_phase_c
    from tests.support.clock import clock_at

    engine = make_engine(db_url)
    with engine.begin() as setup:
        user = add_user(setup)
        ids = [add_delivery(setup, user, add_event(setup, status="fanned_out")) for _ in range(5)]
    channel = WatchingChannel(SmtpEmailChannel(with_fakes(settings, smtp_server)), engine)
    try:
        counts = run_phase_c(Database(engine), clock_at(datetime.now(timezone.utc)), settings,
                             ChannelSet({"email": channel}))
    finally:
        channel.close()
        engine.dispose()

    assert counts["instant"]["sent"] == 5 and len(channel.seen) == 5
    for k, seen in enumerate(channel.seen):
        assert [seen[i] for i in ids[:k]] == ["sent"] * k, (k, seen)
        assert [seen[i] for i in ids[k:]] == ["sending"] * (5 - k), (k, seen)


def test_ingest_event_stores_an_event_once(app, conn):
    event = {"event_key": "gas-nl-1", "alert_type": "price_spike", "region": "NL", "severity": 4,
             "title": "TTF day-ahead +18%"}
    ingest = app.tasks["alerts.ingest_event"]

    assert ingest.apply((event,)).get()["stored"] is True
    assert ingest.apply((dict(event, title="changed"),)).get()["stored"] is False
    assert conn.execute(sa.select(m.alert_events.c.title)).scalars().all() == ["TTF day-ahead +18%"]


def test_ingest_event_accepts_a_collapse_key(app, conn):
    event = {"event_key": "gas-nl-2", "alert_type": "price_spike", "severity": 4, "title": "Flows restored",
             "collapse_key": "nl-compressor-trip"}

    result = app.tasks["alerts.ingest_event"].apply((event,)).get()
    assert (result["stored"], result["status"]) == (True, "fanned_out")
    assert conn.execute(sa.select(m.alert_events.c.collapse_key)).scalars().all() == ["nl-compressor-trip"]


def test_a_malformed_event_fails_its_task_at_once_and_stores_nothing(app, conn):
    with receiving(task_retry) as retried:
        result = app.tasks["alerts.ingest_event"].apply(({"event_key": "k1", "severity": "high"},))

    assert result.failed() and isinstance(result.result, ValueError) and retried == []
    assert conn.execute(sa.select(sa.func.count()).select_from(m.alert_events)).scalar_one() == 0


def test_an_unknown_phase_letter_is_refused(app):
    with pytest.raises(ValueError):
        app.tasks["alerts.run_pipeline"].apply(kwargs={"phases": "az"}, throw=True).get()
