"""The subscriber-facing web app (SPEC §11.2): one-click unsubscribe and a health check.

    GET  /unsubscribe/<token>   a page naming the channel and the masked address, with a
                                button that confirms; changes nothing (mail scanners
                                follow links)
    POST /unsubscribe/<token>   List-Unsubscribe=One-Click (RFC 8058, also the page's
                                button): unsubscribe at once; action=resubscribe: turn
                                the channel's preferences back on
    GET  /healthz               {"database": "ok"} or 503

``alerts.web:app`` is the WSGI application, built from the environment on first use
(``gunicorn alerts.web:app``); ``create_app(settings)`` builds one for given settings.
Nothing here writes a token or a full address to a page or a log: forms have no action
(they post back to the page's own URL), and logged paths have their token cut out.
"""
from __future__ import annotations

import logging
import re

import sqlalchemy as sa
from flask import Flask, abort, render_template, request
from werkzeug.exceptions import HTTPException

from alerts.core import tokens
from alerts.subscribers import unsubscribe as unsub
from alerts.core.settings import MIN_SECRET_KEY_CHARS, ConfigError, Settings
from alerts.core.db import make_engine

log = logging.getLogger(__name__)

# Forms here are one or two short fields; anything larger is refused (413) unread.
MAX_BODY_BYTES = 4096
DB_CONNECT_TIMEOUT_SECONDS = 5
IN_FLIGHT_RETRY_AFTER_SECONDS = 60
CHANNEL_LABELS = {"email": "email", "telegram": "Telegram", "sms": "SMS"}
ONE_CLICK = ("List-Unsubscribe", "One-Click")
INVALID_LINK = "This unsubscribe link is not valid. Please use the link from one of our emails as it is."
_TOKEN_IN_PATH = re.compile(r"(/unsubscribe/)[^/?\s]*")
SECURITY_HEADERS = {
    # No scripts, no third-party anything; inline styles only; forms post to ourselves.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",  # the URL holds the token
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def redact_path(path: str) -> str:
    """A request path or line safe to log: the unsubscribe token replaced by ``***``."""
    return _TOKEN_IN_PATH.sub(r"\1***", path)


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
        engine = make_engine(settings.database_url, connect_timeout=DB_CONNECT_TIMEOUT_SECONDS)
    app = _App(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, MAX_FORM_MEMORY_SIZE=MAX_BODY_BYTES)
    app.jinja_env.autoescape = True  # every template, whatever its name

    def subscriber(token: str) -> unsub.Subscriber:
        try:
            user_id, channel = tokens.read_token(secret_key, token)
        except tokens.BadToken:
            abort(400, INVALID_LINK)
        with engine.connect() as conn:
            found = unsub.find(conn, user_id, channel)
        if found is None:  # a valid token of a user since deleted: nothing to change
            abort(400, INVALID_LINK)
        return found

    def page(template: str, who: unsub.Subscriber) -> str:
        return render_template(template, channel_label=CHANNEL_LABELS[who.channel], subscribed=who.subscribed,
                               address=unsub.mask_address(who.channel, who.address))

    @app.get("/unsubscribe/<token>")
    def unsubscribe_page(token: str):
        return page("unsubscribe.html", subscriber(token))

    @app.post("/unsubscribe/<token>")
    def unsubscribe_post(token: str):
        who = subscriber(token)
        form = request.form
        if form.get("action") == "resubscribe":
            with engine.begin() as conn:
                unsub.resubscribe(conn, who.user_id, who.channel)
            log.info("user %s resubscribed on %s", who.user_id, who.channel)
            return page("resubscribed.html", who)
        if form.get(ONE_CLICK[0]) != ONE_CLICK[1]:
            abort(400, "An unsubscribe is a POST of List-Unsubscribe=One-Click (or action=resubscribe).")
        with engine.begin() as conn:
            counts = unsub.unsubscribe(conn, who.user_id, who.channel)
        log.info("user %s unsubscribed on %s: %s", who.user_id, who.channel, counts)
        if not unsub.wait_in_flight(engine, who.user_id, who.channel):
            # Committed, but a message of theirs may still be on its way: no 200 until
            # nothing can arrive after it (SPEC §11.2). Repeating the POST is harmless.
            body = render_template("error.html", heading="Almost done", message=(
                "Your unsubscribe is recorded. A message that was already being sent may still arrive; "
                "nothing after it will. Please try again in a minute to confirm."))
            return body, 503, {"Retry-After": str(IN_FLIGHT_RETRY_AFTER_SECONDS)}
        return page("unsubscribed.html", who)

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
        message = exc.description
        return render_template("error.html", heading=heading, message=message), exc.code

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
