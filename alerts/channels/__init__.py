"""Channels: one module per way of reaching a person, all behind ``Channel.send``.

A channel takes an already rendered message and a recipient address, returns on success
and raises ``DeliveryError`` on failure, saying whether the failure is permanent and
how long the provider asked us to wait. The send phase, not the channel, records the
outcome on the row.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from alerts.messages import Message


class DeliveryError(Exception):
    """A send failed. ``permanent`` ⇒ do not retry; ``retry_after`` ⇒ provider's wait (s);
    ``gone`` ⇒ (permanent) the destination itself is gone — a bot blocked, a mailbox
    that does not exist — not just this message; ``migrate_to`` ⇒ the provider moved
    the destination to this address (a Telegram group that became a supergroup).

    ``reason`` is stored in ``last_error``: it must never contain a secret.
    """

    def __init__(self, reason: str, *, permanent: bool = False, retry_after: float | None = None,
                 gone: bool = False, migrate_to: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent or gone
        self.retry_after = retry_after
        self.gone = gone
        self.migrate_to = migrate_to


class Channel(ABC):
    name: str

    @abstractmethod
    def send(self, recipient: str, message: Message) -> None:
        """Deliver one message or raise DeliveryError."""

    def close(self) -> None:
        """Release connections held for reuse across sends (SMTP, HTTP session)."""
