"""The single seam for HTTP: a pooled ``requests.Session`` with a timeout on every call.

Network failures become transient ``DeliveryError``s whose reason never names the URL:
the Telegram URL carries the bot token, and requests puts the URL in its messages.
Redirects are not followed: a provider API answers, it does not send us elsewhere, and
following would replay the request (and its credentials) to another address.
"""
from __future__ import annotations

import base64
import logging
import re
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import requests

from alerts.channels import DeliveryError

MAX_DESCRIPTION_CHARS = 300  # provider error texts end up in last_error; keep them short
HTTP_POOL_SIZE = 32  # keep-alive connections per provider: at least a worker's threads


class HttpClient:
    def __init__(self, service: str, timeout: float, secrets: tuple[str | None, ...] = ()):
        self.service = service
        self.timeout = timeout
        self._secrets = secrets
        _log_filter.add(*secrets)
        self._session = requests.Session()  # shared by a worker's threads; urllib3's pool is thread-safe
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=HTTP_POOL_SIZE)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)

    def post(self, url: str, **kwargs) -> requests.Response:
        """POST and return the response, whatever its status; raise only when no answer came."""
        try:
            return self._session.post(url, timeout=self.timeout, allow_redirects=False, **kwargs)
        except requests.Timeout:
            reason = f"{self.service}: no answer within {self.timeout:g}s (timeout)"
        except requests.ConnectionError as exc:
            reason = f"{self.service}: {_connection_problem(exc)}"
        except requests.RequestException as exc:
            reason = f"{self.service}: request failed ({type(exc).__name__})"
        # Outside the except blocks, so the requests exception (and its URL) is not
        # chained into this one's traceback.
        raise DeliveryError(redact(reason, *self._secrets))

    def close(self) -> None:
        self._session.close()


def _connection_problem(exc: BaseException) -> str:
    """Name the underlying socket error (refused, DNS, reset) without the URL."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, OSError) and current.strerror:
            return f"connection failed ({current.strerror})"
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None),
                    *(arg for arg in current.args if isinstance(arg, BaseException))]
    return "connection failed"


def redact(text: str, *secrets: str | None) -> str:
    """Mask secrets in text meant for last_error or logs (belt and braces)."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):  # longest first
        text = text.replace(secret, "***")
    return text


def basic_auth_forms(user: str | None, password: str | None) -> tuple[str, ...]:
    """The password, and the Authorization header value that carries it, as a server or
    proxy might echo them back in an error page."""
    if not password:
        return ()
    token = base64.b64encode(f"{user or ''}:{password}".encode()).decode()
    return (password, token)


def describe(text: object, *secrets: str | None) -> str:
    """A provider's error text, flattened to one line, without control characters (it is
    shown in terminals by ``alerts status``) and bounded. Secrets are masked first:
    cutting first could leave half a token that no longer matches."""
    text = redact(str(text), *secrets)
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat if len(flat) <= MAX_DESCRIPTION_CHARS else flat[: MAX_DESCRIPTION_CHARS - 1] + "…"


def retry_after_seconds(value: object, now: datetime | None = None) -> float | None:
    """A Retry-After value (seconds, or an HTTP date) as seconds to wait; None if unusable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        try:
            when = parsedate_to_datetime(str(value))
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return max(seconds, 0.0) if seconds == seconds else None  # NaN ⇒ unusable


class _RedactUrls(logging.Filter):
    """urllib3 logs request lines and retried URLs (the bot token is in the path) at DEBUG
    level; mask the token, and any credential an HttpClient was built with.

    A logger's filters only see records logged on that very logger, not those of its
    children, so the filter sits on each urllib3 module that logs a URL.
    """

    _TOKEN = re.compile(r"/bot[^/\s\"']+/")

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, *secrets: str | None) -> None:
        self._secrets.update(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(self._TOKEN.sub("/bot***/", message), *self._secrets)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


URLLIB3_URL_LOGGERS = ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry")
_log_filter = _RedactUrls()
for _name in URLLIB3_URL_LOGGERS:
    logging.getLogger(_name).addFilter(_log_filter)
