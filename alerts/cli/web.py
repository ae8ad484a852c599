"""``alerts web``: the subscriber-facing web app on Werkzeug's development server. In
production run it under a WSGI server instead: ``gunicorn alerts.web:app``
(deploy/systemd/alerts-web.service).

Like the app under gunicorn, it starts and serves while the database is down: ``/healthz``
and the pages answer 503 until the database is back, then 200, with no restart. Only a
database it reaches and finds without the current schema stops it (exit 2).
"""
from __future__ import annotations

import click
from werkzeug.serving import WSGIRequestHandler, run_simple

from alerts.cli.common import CONNECTION_ERRORS, Fatal, load_settings
from alerts.core.db import NotMigrated, check_migrated, connection_problem, make_engine
from alerts.core.settings import ConfigError, mask_url_password


class _RedactingHandler(WSGIRequestHandler):
    """Werkzeug's request log, with the tokens cut out of the request line."""

    def log(self, type: str, message: str, *args) -> None:
        from alerts.web import redact_path

        super().log(type, message, *(redact_path(a) if isinstance(a, str) else a for a in args))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
def web(host: str, port: int) -> None:
    """Serve the web app (subscriber pages, Telegram webhook, /metrics, /healthz) on a development server."""
    from alerts.web import DB_CONNECT_TIMEOUT_SECONDS, check_secret_key, create_app

    settings = load_settings()
    try:
        check_secret_key(settings)
    except ConfigError as exc:
        raise Fatal(f"configuration error: {exc}") from None
    engine = make_engine(settings.database_url, connect_timeout=DB_CONNECT_TIMEOUT_SECONDS,
                         prepared_statements=settings.db_prepared_statements)
    try:
        check_migrated(engine)
    except NotMigrated as exc:
        engine.dispose()
        raise Fatal(str(exc)) from None
    except CONNECTION_ERRORS as exc:
        click.echo(f"DATABASE_URL {mask_url_password(settings.database_url)}: cannot reach the database: "
                   f"{connection_problem(exc)}; serving anyway (/healthz and pages answer 503 until it is back)",
                   err=True)
    app = create_app(settings, engine=engine)
    click.echo(f"serving alerts.web on http://{host}:{port}/ (development server; production: gunicorn)", err=True)
    try:
        run_simple(host, port, app, request_handler=_RedactingHandler, threaded=True)
    finally:
        engine.dispose()
