"""The web app (``alerts web``; ``gunicorn alerts.web:app``): what subscribers and
monitors reach over HTTP. Each concern is a blueprint of its own module:

    unsubscribe.py   GET/POST /unsubscribe/<token>: one-click unsubscribe (RFC 8058)
    metrics.py       GET /metrics: the queues for Prometheus (ALERTS_METRICS_TOKEN)
    preferences.py   GET/POST /preferences/<token>: the subscriber's preferences page
    telegram.py      POST /telegram/webhook: the Telegram bot
    (this module)    GET /healthz: {"database": "ok"} or 503

``alerts.web:app`` is the WSGI application, built from the environment on first use;
``create_app(settings)`` builds one for given settings. Nothing here writes a token or a
full address to a page or a log: forms have no action (they post back to the page's own
URL), and logged paths have their token cut out (``redact_path``).
"""
from __future__ import annotations

import logging

import sqlalchemy as sa
from flask import Flask, render_template, request
from werkzeug.exceptions import HTTPException

from alerts.core.db import make_engine
from alerts.core.settings import MIN_SECRET_KEY_CHARS, ConfigError, Settings
from alerts.web import preferences, telegram, unsubscribe
from alerts.web import metrics
from alerts.web.common import INVALID_LINK, WebContext, redact_path

__all__ = ["create_app", "check_secret_key", "redact_path", "MAX_BODY_BYTES"]

log = logging.getLogger(__name__)

# Forms here are short; anything larger is refused (413) unread.
MAX_BODY_BYTES = 4096
DB_CONNECT_TIMEOUT_SECONDS = 5
SECURITY_HEADERS = {
    # No scripts, no third-party anything; inline styles only; forms post to ourselves.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",  # the URL holds the token
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class _App(Flask):
    def log_exception(self, exc_info) -> None:
        # Flask's own would log request.path, token included.
        self.logger.error("Exception on %s [%s]", redact_path(request.path), request.method, exc_info=exc_info)


def check_secret_key(settings: Settings) -> str:
    key = settings.secret_key or ""
    if len(key) < MIN_SECRET_KEY_CHARS:
        raise ConfigError("ALERTS_SECRET_KEY", f"must be set, at least {MIN_SECRET_KEY_CHARS} characters, for "
                          "alerts web (it signs and checks the unsubscribe links)")
    return key


def create_app(settings: Settings, *, engine: sa.Engine | None = None) -> Flask:
    """The app for ``settings``. Raises ConfigError (ALERTS_SECRET_KEY) without a usable key."""
    secret_key = check_secret_key(settings)
    if engine is None:
        engine = make_engine(settings.database_url, connect_timeout=DB_CONNECT_TIMEOUT_SECONDS,
                             prepared_statements=settings.db_prepared_statements)
    app = _App(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, MAX_FORM_MEMORY_SIZE=MAX_BODY_BYTES)
    app.jinja_env.autoescape = True  # every template, whatever its name
    app.extensions["alerts"] = WebContext(settings, engine, secret_key)
    app.register_blueprint(unsubscribe.blueprint)
    app.register_blueprint(metrics.blueprint)
    app.register_blueprint(preferences.blueprint)
    app.register_blueprint(telegram.blueprint)

    @app.get("/healthz")
    def healthz():
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            return {"database": "unreachable"}, 503
        return {"database": "ok"}

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        heading = "This link is not valid" if exc.description == INVALID_LINK else exc.name
        return render_template("error.html", heading=heading, message=exc.description), exc.code

    @app.errorhandler(sa.exc.OperationalError)
    def database_down(exc):
        log.error("database unreachable on %s [%s]: %s", redact_path(request.path), request.method,
                  type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__)
        return render_template("error.html", heading="Try again later",
                               message="We cannot change your subscription right now. Please try again later."), 503

    @app.after_request
    def security_headers(response):
        response.headers.update(SECURITY_HEADERS)
        return response

    return app


_app: Flask | None = None


def __getattr__(name: str):
    """``alerts.web.app``: the app for the environment's settings, built on first use, so
    importing this module (tests, ``create_app``) needs no environment."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = create_app(Settings.from_env())
    return _app
