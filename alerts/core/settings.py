"""Settings: built once from the environment and validated as a whole (docs/configuration.md).

Every variable is checked at start, whether or not this run uses it; a bad value raises
``ConfigError`` naming the variable, which the command line turns into exit code 2.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Mapping
from urllib.parse import urlparse, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from alerts.core.tables import DIGEST_PERIODS
from alerts.core.timeofday import parse_time_of_day

EMAIL_BACKENDS = ("smtp", "file")
SMTP_TLS_MODES = ("none", "starttls", "ssl")
REDIS_SCHEMES = ("redis", "rediss", "unix")
# docs/operations.md: the database kinds we run on; ``postgres://`` (as many hosts write it) is
# read as ``postgresql://``, the rest of the URL (query options included) unchanged.
DATABASE_KINDS = ("postgresql", "sqlite")
DATABASE_SCHEME_ALIASES = {"postgres": "postgresql"}
# The driver is psycopg 3 (alerts/core/db.py). ``postgresql+psycopg2://``, the form an earlier
# release documented, is read as ``postgresql://``: psycopg2 is no longer installed.
DATABASE_DRIVER_ALIASES = {"postgresql+psycopg2": "postgresql"}
# ALERTS_DB_PREPARED_STATEMENTS: "off" behind a transaction-pooling PgBouncer that does
# not track prepared statements (docs/deployment.md, "Behind PgBouncer").
ON_OFF = ("on", "off")

# Celery: the longest countdown a task ever sets on itself (a booked Telegram slot) and
# the longest backoff of Celery's own retries. The Redis visibility timeout must stay far
# above both, or Redis would hand a waiting task to a second worker while the first
# still holds it; longer waits live in the rows' next_retry_at, never in the broker.
MAX_COUNTDOWN_SECONDS = 60
INFRA_BACKOFF_MAX_SECONDS = 60
MIN_VISIBILITY_TIMEOUT_SECONDS = 10 * max(MAX_COUNTDOWN_SECONDS, INFRA_BACKOFF_MAX_SECONDS)

# Names of settings whose values must never be printed (logs, status, errors).
SECRET_FIELDS = frozenset({"smtp_password", "telegram_bot_token", "twilio_auth_token", "secret_key",
                           "telegram_webhook_secret", "metrics_token"})
# URL settings that may carry a password (postgresql://user:pw@…, redis://:pw@…).
URL_FIELDS = frozenset({"database_url", "celery_broker_url", "app_base_url", "telegram_api_base",
                        "twilio_api_base", "ratelimit_redis_url", "public_url"})
MIN_SECRET_KEY_CHARS = 32
# Telegram's rules for a webhook's secret_token and for a bot's username (docs/telegram-bot.md).
TELEGRAM_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
TELEGRAM_USERNAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{3,31}")
SEVERITIES = (1, 5)
# ALERTS_METRICS_TOKEN: what an Authorization header can carry (visible ASCII, no spaces).
METRICS_TOKEN = re.compile(r"[!-~]{1,4096}")
# ALERTS_BOUNCE_ADDRESS: local@domain, the local part a dot-atom without "+" (the token
# goes after a "+") short enough that local+TOKEN stays within SMTP's 64 characters.
_ATOM, _LABEL = r"[A-Za-z0-9!#$%&'*/=?^_`{|}~-]+", r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
BOUNCE_ADDRESS = re.compile(rf"(?=[^@]{{1,37}}@){_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*")


class ConfigError(ValueError):
    """An environment variable has a value we cannot use."""

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///alerts.db"
    db_prepared_statements: bool = True
    celery_broker_url: str = "redis://localhost:6379/0"
    timezone: str = "Europe/Amsterdam"
    digest_period: str = "daily"
    hourly_digest_plans: frozenset[str] = frozenset()
    app_base_url: str | None = None
    # docs/policy.md: the reader's schedule
    digest_send_time: str = "00:00"
    digest_bypass_severity: int | None = None
    quiet_hours_bypass_severity: int = 5
    # docs/web-and-security.md: the subscriber-facing web app
    public_url: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    # Operators: /metrics' bearer token; the envelope sender that collects bounces (VERP)
    metrics_token: str | None = field(default=None, repr=False)
    bounce_address: str | None = None
    max_attempts: int = 5
    retry_base_seconds: int = 60
    retry_max_seconds: int = 3600
    sending_lease_seconds: int = 600
    email_backend: str = "smtp"
    outbox_dir: str = "outbox"
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_tls: str = "starttls"
    smtp_timeout_seconds: float = 30.0
    email_from: str = "EnergyRiskIQ Alerts <alerts@energyriskiq.com>"
    telegram_bot_token: str | None = field(default=None, repr=False)
    telegram_api_base: str = "https://api.telegram.org"
    # The Telegram bot (docs/telegram-bot.md): its username (t.me links), the webhook's secret token
    telegram_bot_username: str | None = None
    telegram_webhook_secret: str | None = field(default=None, repr=False)
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = field(default=None, repr=False)
    twilio_from: str | None = None
    twilio_api_base: str = "https://api.twilio.com/2010-04-01"
    http_timeout_seconds: float = 10.0
    send_batch_size: int = 200
    # Celery (celery_app.py, beat_schedule.py)
    celery_visibility_timeout_seconds: int = 3600
    reenqueue_after_seconds: int = 600
    ratelimit_redis_url: str | None = None  # None: no Redis to share the Telegram limit in
    beat_intake_seconds: int = 30
    beat_digest_seconds: int = 60
    beat_dispatch_seconds: int = 15
    beat_recover_seconds: int = 60

    @property
    def broker_is_redis(self) -> bool:
        return _scheme(self.celery_broker_url) in REDIS_SCHEMES

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def redacted(self) -> dict:
        """All settings as a dict with secrets (and passwords inside URLs) masked, safe
        to print."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "***"
            elif f.name in URL_FIELDS and value:
                value = mask_url_password(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            out[f.name] = value
        return out

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"{type(self).__name__}({shown})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        r = EnvReader(env)
        broker_url = r.text("CELERY_BROKER_URL", cls.celery_broker_url)
        settings = cls(
            database_url=r.database_url("DATABASE_URL", cls.database_url),
            db_prepared_statements=r.choice("ALERTS_DB_PREPARED_STATEMENTS", ON_OFF, "on") == "on",
            celery_broker_url=broker_url,
            timezone=r.timezone("ALERTS_TIMEZONE", cls.timezone),
            digest_period=r.choice("ALERTS_DIGEST_PERIOD", DIGEST_PERIODS, cls.digest_period),
            hourly_digest_plans=r.csv("ALERTS_HOURLY_DIGEST_PLANS"),
            app_base_url=r.http_url("ALERTS_APP_BASE_URL"),
            digest_send_time=r.clock_time("ALERTS_DIGEST_SEND_TIME", cls.digest_send_time),
            digest_bypass_severity=r.optional_integer("ALERTS_DIGEST_BYPASS_SEVERITY", *SEVERITIES),
            quiet_hours_bypass_severity=r.integer("ALERTS_QUIET_HOURS_BYPASS_SEVERITY", cls.quiet_hours_bypass_severity,
                                                  *SEVERITIES),
            public_url=r.http_url("ALERTS_PUBLIC_URL"),
            secret_key=r.optional("ALERTS_SECRET_KEY"),
            metrics_token=_metrics_token(r),
            bounce_address=_bounce_address(r),
            max_attempts=r.integer("ALERTS_MAX_ATTEMPTS", cls.max_attempts, minimum=1),
            retry_base_seconds=r.integer("ALERTS_RETRY_BASE_SECONDS", cls.retry_base_seconds, minimum=0),
            retry_max_seconds=r.integer("ALERTS_RETRY_MAX_SECONDS", cls.retry_max_seconds, minimum=0),
            sending_lease_seconds=r.integer("ALERTS_SENDING_LEASE_SECONDS", cls.sending_lease_seconds, minimum=1),
            email_backend=r.choice("ALERTS_EMAIL_BACKEND", EMAIL_BACKENDS, cls.email_backend),
            outbox_dir=r.text("ALERTS_OUTBOX_DIR", cls.outbox_dir),
            smtp_host=r.optional("ALERTS_SMTP_HOST"),
            smtp_port=r.integer("ALERTS_SMTP_PORT", cls.smtp_port, minimum=1, maximum=65535),
            smtp_user=r.optional("ALERTS_SMTP_USER"),
            smtp_password=r.optional("ALERTS_SMTP_PASSWORD"),
            smtp_tls=r.choice("ALERTS_SMTP_TLS", SMTP_TLS_MODES, cls.smtp_tls),
            smtp_timeout_seconds=r.number("ALERTS_SMTP_TIMEOUT_SECONDS", cls.smtp_timeout_seconds),
            email_from=r.text("ALERTS_EMAIL_FROM", cls.email_from),
            telegram_bot_token=r.optional("ALERTS_TELEGRAM_BOT_TOKEN"),
            telegram_api_base=r.http_url("ALERTS_TELEGRAM_API_BASE") or cls.telegram_api_base,
            telegram_bot_username=r.matching("ALERTS_TELEGRAM_BOT_USERNAME", TELEGRAM_USERNAME,
                                             "5-32 letters, digits or _, starting with a letter", strip="@"),
            telegram_webhook_secret=r.matching("ALERTS_TELEGRAM_WEBHOOK_SECRET", TELEGRAM_WEBHOOK_SECRET,
                                               "1-256 characters of A-Z a-z 0-9 _ -", shown=False),
            twilio_account_sid=r.optional("ALERTS_TWILIO_ACCOUNT_SID"),
            twilio_auth_token=r.optional("ALERTS_TWILIO_AUTH_TOKEN"),
            twilio_from=r.optional("ALERTS_TWILIO_FROM"),
            twilio_api_base=r.http_url("ALERTS_TWILIO_API_BASE") or cls.twilio_api_base,
            http_timeout_seconds=r.number("ALERTS_HTTP_TIMEOUT_SECONDS", cls.http_timeout_seconds),
            send_batch_size=r.integer("ALERTS_SEND_BATCH_SIZE", cls.send_batch_size, minimum=1),
            celery_visibility_timeout_seconds=r.integer(
                "ALERTS_CELERY_VISIBILITY_TIMEOUT_SECONDS", cls.celery_visibility_timeout_seconds,
                minimum=MIN_VISIBILITY_TIMEOUT_SECONDS),
            reenqueue_after_seconds=r.integer("ALERTS_REENQUEUE_AFTER_SECONDS", cls.reenqueue_after_seconds, minimum=1),
            ratelimit_redis_url=_ratelimit_redis_url(r, broker_url),
            beat_intake_seconds=r.integer("ALERTS_BEAT_INTAKE_SECONDS", cls.beat_intake_seconds, minimum=1),
            beat_digest_seconds=r.integer("ALERTS_BEAT_DIGEST_SECONDS", cls.beat_digest_seconds, minimum=1),
            beat_dispatch_seconds=r.integer("ALERTS_BEAT_DISPATCH_SECONDS", cls.beat_dispatch_seconds, minimum=1),
            beat_recover_seconds=r.integer("ALERTS_BEAT_RECOVER_SECONDS", cls.beat_recover_seconds, minimum=1),
        )
        if settings.public_url and (urlsplit(settings.public_url).query or "#" in settings.public_url):
            raise ConfigError("ALERTS_PUBLIC_URL", "must not have a query or fragment (links append /unsubscribe/…)")
        if settings.public_url and len(settings.secret_key or "") < MIN_SECRET_KEY_CHARS:
            raise ConfigError("ALERTS_SECRET_KEY", f"must be set, at least {MIN_SECRET_KEY_CHARS} characters, when "
                              "ALERTS_PUBLIC_URL is set (it signs the unsubscribe links)")
        if settings.bounce_address and len(settings.secret_key or "") < MIN_SECRET_KEY_CHARS:
            raise ConfigError("ALERTS_SECRET_KEY", f"must be set, at least {MIN_SECRET_KEY_CHARS} characters, when "
                              "ALERTS_BOUNCE_ADDRESS is set (it signs the bounce addresses)")
        if settings.telegram_webhook_secret and not settings.telegram_bot_token:
            # The webhook answers in the chat and registers itself with the bot's token.
            raise ConfigError("ALERTS_TELEGRAM_BOT_TOKEN", "required when ALERTS_TELEGRAM_WEBHOOK_SECRET is set")
        if settings.telegram_bot_token and settings.ratelimit_redis_url is None:
            # Without a Redis to share it in, the Telegram limit would be off: a burst
            # would go out unthrottled into Telegram's 429s.
            raise ConfigError("ALERTS_RATELIMIT_REDIS_URL", "required (a redis:// URL for the shared Telegram rate "
                              "limit) when CELERY_BROKER_URL is not Redis and ALERTS_TELEGRAM_BOT_TOKEN is set")
        return settings


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _ratelimit_redis_url(r: "EnvReader", broker_url: str) -> str | None:
    """The Redis that holds the Telegram rate limit: ALERTS_RATELIMIT_REDIS_URL, else the
    broker's when the broker is Redis."""
    url = r.optional("ALERTS_RATELIMIT_REDIS_URL")
    if url is None:
        return broker_url if _scheme(broker_url) in REDIS_SCHEMES else None
    if _scheme(url) not in REDIS_SCHEMES:
        raise ConfigError("ALERTS_RATELIMIT_REDIS_URL", "must be a redis://, rediss:// or unix:// URL")
    return url


def _metrics_token(r: "EnvReader") -> str | None:
    value = r.optional("ALERTS_METRICS_TOKEN")
    if value is not None and not METRICS_TOKEN.fullmatch(value):
        raise ConfigError("ALERTS_METRICS_TOKEN", "must be visible ASCII characters, no spaces")  # never echoed
    return value


def _bounce_address(r: "EnvReader") -> str | None:
    value = r.optional("ALERTS_BOUNCE_ADDRESS")
    if value is not None and not BOUNCE_ADDRESS.fullmatch(value):
        raise ConfigError("ALERTS_BOUNCE_ADDRESS", "must be an address local@domain whose local part (1-37 "
                          f"characters) has no '+' (got {value!r})")
    return value


def mask_url_password(url: str) -> str:
    """``scheme://user:***@host/…``: the URL with its password (if any) masked — also
    one given as a query option (libpq reads ``?password=…``)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "***"  # unparseable: it may hold anything
    if password:
        user, _, host = parts.netloc.rpartition("@")
        user = user.split(":", 1)[0]
        url = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    base, question, query = url.partition("?")
    return base + question + _QUERY_PASSWORD.sub(r"\1***", query)


_QUERY_PASSWORD = re.compile(r"((?:^|&)[^=&]*password=)[^&]*", re.IGNORECASE)


class EnvReader:
    """Reads and validates one variable at a time; empty counts as unset."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def optional(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = (self.optional(name) or default).lower()
        if value not in allowed:
            raise ConfigError(name, f"must be one of {', '.join(allowed)} (got {value!r})")
        return value

    def integer(self, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, f"must be a whole number (got {raw!r})") from None
        if minimum is not None and value < minimum:
            raise ConfigError(name, f"must be at least {minimum} (got {value})")
        if maximum is not None and value > maximum:
            raise ConfigError(name, f"must be at most {maximum} (got {value})")
        return value

    def optional_integer(self, name: str, minimum: int, maximum: int) -> int | None:
        return None if self.optional(name) is None else self.integer(name, 0, minimum, maximum)

    def clock_time(self, name: str, default: str) -> str:
        """A 24-hour local time of day, HH:MM."""
        value = self.optional(name) or default
        try:
            parse_time_of_day(value)
        except ValueError:
            raise ConfigError(name, f"must be a time of day as HH:MM, 00:00 to 23:59 (got {value!r})") from None
        return value

    def database_url(self, name: str, default: str) -> str:
        """A SQLAlchemy URL of a kind we support (``postgresql[+driver]``, ``sqlite``)."""
        value = self.text(name, default)
        scheme, sep, rest = value.partition("://")
        kind, plus, driver = scheme.lower().partition("+")
        kind = DATABASE_SCHEME_ALIASES.get(kind, kind)
        if not sep or kind not in DATABASE_KINDS:
            shown = f"{scheme}://" if sep else "no scheme"
            raise ConfigError(name, f"unsupported kind of database ({shown}); use postgresql://… or sqlite:///…")
        scheme = f"{kind}{plus}{driver}"
        return f"{DATABASE_DRIVER_ALIASES.get(scheme, scheme)}://{rest}"

    def number(self, name: str, default: float) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(name, f"must be a number (got {raw!r})") from None
        if not value > 0:
            raise ConfigError(name, f"must be greater than 0 (got {raw!r})")
        return value

    def timezone(self, name: str, default: str) -> str:
        value = self.optional(name) or default
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(name, f"unknown IANA time zone {value!r}") from None
        return value

    def matching(self, name: str, pattern: re.Pattern, rule: str, *, strip: str = "",
                 shown: bool = True) -> str | None:
        """An optional value that must match ``pattern`` whole (after removing a leading
        ``strip``); a secret (``shown=False``) is never echoed in the error."""
        value = self.optional(name)
        if value is None:
            return None
        value = value[len(strip):] if strip and value.startswith(strip) else value
        if not pattern.fullmatch(value):
            raise ConfigError(name, f"must be {rule}" + (f" (got {value!r})" if shown else ""))
        return value

    def csv(self, name: str) -> frozenset[str]:
        raw = self.optional(name) or ""
        return frozenset(part.strip() for part in raw.split(",") if part.strip())

    def http_url(self, name: str) -> str | None:
        value = self.optional(name)
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(name, "must be an absolute http(s) URL")
        return value.rstrip("/")
