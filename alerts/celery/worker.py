"""What one Celery worker process keeps between tasks: its settings, one SQLAlchemy
engine, one set of channels and the Telegram rate limiter — one state per process,
each part made on first use.

The threads of a ``--pool threads`` worker share all of it: the engine's pool hands each
transaction a connection of its own, the HTTP channels pool keep-alive connections for
every thread, and only the email channel keeps a connection per thread (an SMTP
conversation carries one message at a time; see ``SmtpEmailChannel``).

A prefork child starts with a copy of its parent's state. Following SQLAlchemy's recipe
for engines and forked processes ("Using Connection Pools with Multiprocessing or
os.fork()"), the child calls ``engine.dispose(close=False)``: it forgets the parent's
pooled connections without closing them — they are the parent's sessions on shared
sockets — and opens its own. Channels and the limiter are made afresh for the same
reason.
"""
from __future__ import annotations

import logging
import threading

import redis
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown

from alerts.channels.registry import ChannelSet, build_channels
from alerts.core.settings import Settings
from alerts.core.db import Database, check_migrated, make_engine
from alerts.sending.ratelimit import TelegramLimiter

log = logging.getLogger(__name__)

REDIS_TIMEOUT_SECONDS = 5.0
# Enough for every thread of a threads-pool worker to hold a connection at once (a
# transaction is all a thread ever holds); connections are opened only as needed.
ENGINE_POOL_SIZE = 16


class WorkerState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settings: Settings | None = None
        self._engine = None
        self._channels: ChannelSet | None = None
        self._limiter: TelegramLimiter | None = None

    def configure(self, settings: Settings | None = None, limiter: TelegramLimiter | None = None) -> None:
        """Start over with these (tests); None ⇒ from the environment on first use."""
        self.close()
        self._settings, self._limiter = settings, limiter

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()  # celery_app validated it at start
        return self._settings

    def db(self) -> Database:
        with self._lock:
            if self._engine is None:
                engine = make_engine(self.settings.database_url, pool_size=ENGINE_POOL_SIZE,
                                     prepared_statements=self.settings.db_prepared_statements)
                try:
                    check_migrated(engine)
                except BaseException:
                    engine.dispose()
                    raise
                self._engine = engine
            return Database(self._engine)

    def channels(self) -> ChannelSet:
        """The channels, carrying the Telegram limiter their sends ask first."""
        limiter = self.limiter()
        with self._lock:
            if self._channels is None:
                channels = build_channels(self.settings)
                if channels.get("telegram") is not None:
                    channels.limiter = limiter
                self._channels = channels
            return self._channels

    def limiter(self) -> TelegramLimiter | None:
        """The Telegram limit shared through Redis (None when no Redis is configured for
        it, which config allows only when no bot token is set)."""
        with self._lock:
            if self._limiter is None and self.settings.ratelimit_redis_url:
                self._limiter = TelegramLimiter(redis.Redis.from_url(
                    self.settings.ratelimit_redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                    socket_connect_timeout=REDIS_TIMEOUT_SECONDS))
            return self._limiter

    def after_fork(self) -> None:
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._engine = self._channels = self._limiter = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            channels, engine = self._channels, self._engine
            self._channels = self._engine = self._limiter = None
        if channels is not None:
            channels.close()
        if engine is not None:
            engine.dispose()


state = WorkerState()


@worker_process_init.connect
def _after_fork(**_) -> None:
    state.after_fork()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _on_shutdown(**_) -> None:
    state.close()
