"""The one send path (alerts/sending/service.py) as the runner uses it: one row's bug
never stops the batch or strands a claim, what a send asks first (an unsubscribe or a
block committed since the batch was loaded, the Telegram limit) is asked before every
send, and the runner keeps Telegram's limits with or without a Redis to share them in."""
from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa

from alerts.channels import Channel
from alerts.channels.registry import ChannelSet, build_channels
from alerts.core import tables as m
from alerts.core.db import Database
from alerts.core.settings import Settings
from alerts.phases.pipeline import session
from alerts.phases.send import send_due
from alerts.sending import blocks
from alerts.sending.outbox import INSTANT
from alerts.sending.ratelimit import LocalLimiter, TelegramLimiter, runner_limiter
from alerts.subscribers import unsubscribe as unsub
from tests.support.clock import clock_at
from tests.support.factories import WINDOW_END, add_delivery, add_event, add_pref, add_user
from tests.support.fakes.fixtures import with_fakes

NOW = WINDOW_END + timedelta(minutes=1)


def seed(engine, users: list[int] | None = None, per_user: int = 1, channel: str = "email", **user_cols) -> list[int]:
    """Queued instant deliveries, ``per_user`` for each of ``users`` new users (in id order)."""
    ids = []
    with engine.begin() as conn:
        for n in range(len(users) if users else 1):
            user = add_user(conn, email=f"reader{n}@example.com", telegram_chat_id=f"{4200 + n}", **user_cols)
            add_pref(conn, user, channel=channel)
            for _ in range(per_user):
                ids.append(add_delivery(conn, user, add_event(conn, status="fanned_out"), channel=channel))
    return ids


def statuses(engine) -> list[tuple]:
    d = m.user_alert_deliveries
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(d.c.id, d.c.status, d.c.attempts, d.c.last_error)
                                               .order_by(d.c.id))]


class Scripted(Channel):
    """An email channel that records what it sent and runs ``before(recipient, n)`` first."""

    name = "email"

    def __init__(self, before=None):
        self.sent: list[str] = []
        self.before = before

    def send(self, recipient, message) -> None:
        if self.before is not None:
            self.before(recipient, len(self.sent))
        self.sent.append(recipient)


# --- one row's bug --------------------------------------------------------------------------

def test_a_send_that_raises_our_own_error_fails_that_row_alone_and_the_batch_goes_on(engine):
    first, broken, last = seed(engine, users=[1, 2, 3])

    def before(recipient, n):
        if recipient == "reader1@example.com":
            raise KeyError("a bug in a channel")

    channel = Scripted(before)
    counts = send_due(Database(engine), INSTANT, clock_at(NOW), Settings(), ChannelSet({"email": channel}))

    assert counts.as_dict() == {"sent": 2, "retried": 0, "failed": 1, "skipped": 0}
    assert statuses(engine) == [(first, "sent", 1, None), (broken, "failed", 1, "internal error: KeyError"),
                                (last, "sent", 1, None)]
    assert channel.sent == ["reader0@example.com", "reader2@example.com"]


def test_a_message_that_cannot_be_built_fails_that_row_alone(engine, monkeypatch):
    import alerts.sending.outbox

    first, broken, last = seed(engine, users=[1, 2, 3])
    real = alerts.sending.outbox.render_instant

    def render(channel, row, *, delivery_id, **kwargs):
        if delivery_id == broken:
            raise ZeroDivisionError("a template bug")
        return real(channel, row, delivery_id=delivery_id, **kwargs)

    monkeypatch.setattr(alerts.sending.outbox, "render_instant", render)
    channel = Scripted()
    send_due(Database(engine), INSTANT, clock_at(NOW), Settings(), ChannelSet({"email": channel}))

    assert statuses(engine) == [(first, "sent", 1, None), (broken, "failed", 1, "internal error: ZeroDivisionError"),
                                (last, "sent", 1, None)]
    assert len(channel.sent) == 2


def test_an_error_outside_any_send_gives_back_every_claim_not_yet_tried(engine):
    """A failure the batch cannot ride out (here: the limiter's Redis gone) ends the run
    with an error, yet leaves nothing in ``sending``: the rows not tried are queued again
    as they were, no attempt counted."""
    rows = seed(engine, users=[1, 2, 3], channel="telegram")

    class BrokenLimiter:
        def acquire(self, chat_id, **_):
            raise ConnectionError("redis went away")

    channels = ChannelSet({"telegram": Scripted()}, limiter=BrokenLimiter())
    with pytest.raises(ConnectionError):
        send_due(Database(engine), INSTANT, clock_at(NOW), Settings(), channels)

    assert statuses(engine) == [(row, "queued", 0, None) for row in rows]


# --- asked before every send -----------------------------------------------------------------

def test_an_unsubscribe_committed_while_the_runner_holds_its_batch_stops_the_rest_of_it(engine):
    rows = seed(engine, per_user=3)
    (user,) = {u for u in _users(engine)}

    def before(recipient, n):
        if n == 0:  # the reader clicks unsubscribe while the first message is on its way
            with engine.begin() as conn:
                unsub.unsubscribe(conn, user, "email")

    channel = Scripted(before)
    send_due(Database(engine), INSTANT, clock_at(NOW), Settings(), ChannelSet({"email": channel}))

    assert channel.sent == ["reader0@example.com"]
    assert statuses(engine) == [(rows[0], "sent", 1, None), (rows[1], "skipped", 0, m.UNSUBSCRIBED),
                                (rows[2], "skipped", 0, m.UNSUBSCRIBED)]


def test_a_block_committed_while_the_runner_holds_its_batch_stops_the_rest_of_that_destination(engine):
    rows = seed(engine, per_user=3)
    (user,) = {u for u in _users(engine)}

    def before(recipient, n):
        if n == 0:  # a bounce arrives for the address meanwhile
            with engine.begin() as conn:
                blocks.record(conn, user, "email", recipient, "bounce: 5.1.1 gone", NOW)

    channel = Scripted(before)
    send_due(Database(engine), INSTANT, clock_at(NOW), Settings(), ChannelSet({"email": channel}))

    assert channel.sent == ["reader0@example.com"]
    reason = m.destination_disabled("bounce: 5.1.1 gone")
    assert statuses(engine)[1:] == [(rows[1], "skipped", 0, reason), (rows[2], "skipped", 0, reason)]


def _users(engine) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(sa.select(m.users.c.id)).scalars().all()


# --- the Telegram limit on the runner's path ------------------------------------------------------

def test_the_runner_without_redis_keeps_one_message_per_second_to_a_chat(pg_url, tmp_path, provider_api):
    settings = with_fakes(replace(Settings.from_env({"DATABASE_URL": pg_url}), ratelimit_redis_url=None),
                          api=provider_api)
    from alerts.core.db import make_engine

    engine = make_engine(pg_url)
    try:
        seed(engine, per_user=3, channel="telegram")
        with session(engine, settings) as (db, channels):
            assert isinstance(channels.limiter, LocalLimiter)
            counts = send_due(db, INSTANT, clock_at(NOW), settings, channels)
    finally:
        engine.dispose()

    assert counts.sent == 3
    arrivals = [at for chat, at in provider_api.telegram_requests]
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert len(arrivals) == 3 and all(gap >= 0.9 for gap in gaps), gaps


def test_the_runner_asks_the_redis_limit_the_workers_share(engine, redis_server, provider_api):
    import redis

    url = redis_server.url(3)
    redis.Redis.from_url(url).flushdb()
    shared = TelegramLimiter(redis.Redis.from_url(url))
    limiter = runner_limiter(url)
    assert isinstance(limiter, TelegramLimiter)
    seed(engine, channel="telegram")
    assert shared.acquire("4200").go  # a worker just sent to the chat: its second is taken

    settings = with_fakes(Settings(), api=provider_api)
    channels = build_channels(settings)
    channels.limiter = limiter
    started = time.monotonic()
    try:
        counts = send_due(Database(engine), INSTANT, clock_at(NOW), settings, channels)
    finally:
        channels.close()

    assert counts.sent == 1
    assert time.monotonic() - started >= 0.9, "the runner sent inside the second a worker had used"


def test_a_runner_whose_redis_does_not_answer_keeps_the_limit_itself():
    assert isinstance(runner_limiter("redis://127.0.0.1:1/0"), LocalLimiter)
    assert isinstance(runner_limiter(None), LocalLimiter)


def test_the_local_limiter_books_a_chats_next_second_like_the_redis_one():
    ms = [0]
    limiter = LocalLimiter(clock_ms=lambda: ms[0])

    first, second, third = (limiter.acquire("42") for _ in range(3))

    assert (first.go, first.wait) == (True, 0)
    assert (second.chat_held, second.go, second.wait) == (True, False, 1.0)
    assert (third.chat_held, third.go, third.wait) == (True, False, 2.0)
    ms[0] = 1000
    assert limiter.acquire("42", chat_held=True).go


def test_the_local_limiter_keeps_thirty_a_second_overall():
    ms = [0]
    limiter = LocalLimiter(clock_ms=lambda: ms[0])

    granted = [limiter.acquire(str(chat)) for chat in range(60)]

    assert sum(1 for p in granted if p.go and p.wait == 0) == 5  # the burst, then 25/s
    assert max(p.wait for p in granted) <= 2.5


def test_the_runner_never_sleeps_on_a_claim_past_half_its_lease(engine, monkeypatch):
    """A claim slept on past the lease could be recovered by a worker and sent twice (the
    soak caught it): a wait for the Telegram limit longer than the half lease left gives
    the row back, due when its slot comes, instead."""
    (row,) = seed(engine, channel="telegram")
    ms = [0]
    limiter = LocalLimiter(clock_ms=lambda: ms[0])
    for _ in range(5):  # the chat's next five seconds are booked by the workers
        limiter.acquire("4200", max_reserve=60)
    channel = Scripted()
    channel.name = "telegram"
    settings = replace(Settings(), sending_lease_seconds=4)
    slept: list[float] = []

    import alerts.phases.send

    monkeypatch.setattr(alerts.phases.send.time, "sleep", slept.append)
    counts = send_due(Database(engine), INSTANT, clock_at(NOW), settings,
                      ChannelSet({"telegram": channel}, limiter=limiter))

    assert counts.sent == 0 and channel.sent == [] and slept == []
    d = m.user_alert_deliveries
    with engine.connect() as conn:
        status, attempts, due = conn.execute(sa.select(d.c.status, d.c.attempts, d.c.next_retry_at)
                                             .where(d.c.id == row)).one()
    assert (status, attempts) == ("queued", 0)
    assert timedelta(seconds=4) < due - NOW < timedelta(seconds=7)
