"""What the web app's blueprints share: the app's context (settings, engine, key), the
invalid-link message, and the redaction of tokens from logged paths."""
from __future__ import annotations

import re
from dataclasses import dataclass

import sqlalchemy as sa
from flask import current_app

from alerts.core.settings import Settings

# Paths whose next segment is a secret token: cut out of every logged path.
_TOKEN_IN_PATH = re.compile(r"(/(?:unsubscribe|preferences)/)[^/?\s]*")
INVALID_LINK = "This unsubscribe link is not valid. Please use the link from one of our emails as it is."


@dataclass(frozen=True)
class WebContext:
    """What every view needs: the settings, the engine and the signing key."""

    settings: Settings
    engine: sa.Engine
    secret_key: str


def context() -> WebContext:
    return current_app.extensions["alerts"]


def redact_path(path: str) -> str:
    """A request path or line safe to log: the token replaced by ``***``."""
    return _TOKEN_IN_PATH.sub(r"\1***", path)
