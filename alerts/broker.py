"""The Redis broker transport the Celery app uses for ``redis://`` and ``rediss://`` URLs.

It is kombu's own Redis transport with one change: a channel keeps one Redis client for
its commands instead of building a new one for every command. kombu 5.7 builds a fresh
``redis.Redis`` (connections still come from the channel's pool) for each publish, and
for the bookkeeping around every delivered message — recording it as unacked on
delivery, removing it on ack — and building one costs more CPU than the Redis round
trip it is for (redis-py fills a table of some 300 response callbacks per client). A
worker sending a message per task does this twice per task; ``alerts.build_digests``
once per task it publishes.

Sharing the client is safe: a ``redis.Redis`` is a thin, thread-safe front to its
connection pool, and kombu never closes the clients it gets this way. When kombu drops
its pools (after a connection error) the next command builds a client on the new pool.
"""
from __future__ import annotations

from kombu.transport import redis as kombu_redis

TRANSPORT = f"{__name__}:Transport"
SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    _shared_client = None

    def _create_client(self, asynchronous: bool = False):
        if asynchronous:  # the consumer's BRPOP client: kombu keeps that one itself
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """This transport for a Redis broker URL; None (kombu's choice) for any other."""
    scheme = broker_url.split("://", 1)[0] if "://" in broker_url else ""
    return TRANSPORT if scheme in SCHEMES else None
