"""``alerts web``: the subscriber-facing web app (SPEC §11.2) on Werkzeug's development
server. In production run it under a WSGI server instead: ``gunicorn alerts.web:app``."""
from __future__ import annotations

import click
from werkzeug.serving import WSGIRequestHandler, run_simple

from alerts.cli.common import Fatal, load_settings, open_engine
from alerts.core.settings import ConfigError


class _RedactingHandler(WSGIRequestHandler):
    """Werkzeug's request log, with the unsubscribe token cut out of the request line."""

    def log(self, type: str, message: str, *args) -> None:
        from alerts.web import redact_path

        super().log(type, message, *(redact_path(a) if isinstance(a, str) else a for a in args))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
def web(host: str, port: int) -> None:
    """Serve the unsubscribe pages and /healthz (development server)."""
    from alerts.web import check_secret_key, create_app

    settings = load_settings()
    try:
        check_secret_key(settings)
    except ConfigError as exc:
        raise Fatal(f"configuration error: {exc}") from None
    engine = open_engine(settings)  # exit 2 on an unmigrated database
    app = create_app(settings, engine=engine)
    click.echo(f"serving alerts.web on http://{host}:{port}/ (development server; production: gunicorn)", err=True)
    try:
        run_simple(host, port, app, request_handler=_RedactingHandler, threaded=True)
    finally:
        engine.dispose()
