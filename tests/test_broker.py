"""alerts.broker: kombu's Redis transport with one Redis client per channel."""
from __future__ import annotations

import os

import pytest
import redis
from kombu import Connection, Exchange, Queue

from alerts import broker

BROKER_URL = os.environ.get("ALERTS_TEST_BROKER_URL", "redis://127.0.0.1:6379/9")


@pytest.fixture
def connection():
    redis.Redis.from_url(BROKER_URL).flushdb()
    with Connection(BROKER_URL, transport=broker.TRANSPORT) as connection:
        yield connection
    redis.Redis.from_url(BROKER_URL).flushdb()


def test_the_app_uses_it_for_redis_urls_only():
    assert broker.transport_for("redis://127.0.0.1:6379/0") == broker.TRANSPORT
    assert broker.transport_for("rediss://cache.example.com:6380/0?ssl_cert_reqs=required") == broker.TRANSPORT
    assert broker.transport_for("amqp://guest@localhost//") is None
    assert broker.transport_for("sentinel://localhost:26379") is None


def test_a_channel_sends_its_commands_through_one_client(connection):
    channel = connection.default_channel
    assert isinstance(channel, broker.Channel)
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second


def test_a_channel_builds_a_new_client_after_kombu_drops_its_pools(connection):
    channel = connection.default_channel
    with channel.conn_or_acquire() as before:
        pass
    channel._disconnect_pools()  # what kombu does after a connection error
    with channel.conn_or_acquire() as after:
        assert after is not before and after.connection_pool is channel.pool
        assert after.ping()


def test_messages_published_acked_and_redelivered_as_with_kombus_own(connection):
    """Publish, take without ack (it waits in the unacked set), give back; take and ack."""
    queue = Queue("broker-test", Exchange("broker-test"), routing_key="broker-test")
    with connection.Producer() as producer:
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="broker-test", declare=[queue],
                             serializer="json")
    simple = connection.SimpleQueue(queue)
    first = simple.get(timeout=5)
    assert redis.Redis.from_url(BROKER_URL).hlen("unacked") == 1
    first.requeue()
    got = sorted(message.payload["n"] for message in [simple.get(timeout=5) for _ in range(3)] if not message.ack())
    simple.close()

    assert got == [0, 1, 2]
    assert redis.Redis.from_url(BROKER_URL).hlen("unacked") == 0
