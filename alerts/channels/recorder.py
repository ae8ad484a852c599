"""A channel for dry runs: remembers what it was asked to send, sends nothing."""
from __future__ import annotations

from typing import NamedTuple

from alerts.channels import Channel
from alerts.messages import Message


class Recorded(NamedTuple):
    channel: str
    recipient: str
    message: Message


class RecordingChannel(Channel):
    """Always succeeds. Channels of one run share ``log`` so it keeps the send order."""

    def __init__(self, name: str, log: list[Recorded] | None = None):
        self.name = name
        self.log = [] if log is None else log

    def send(self, recipient: str, message: Message) -> None:
        self.log.append(Recorded(self.name, recipient, message))
