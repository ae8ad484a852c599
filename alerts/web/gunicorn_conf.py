"""gunicorn's configuration for the web app: ``gunicorn --config python:alerts.web.gunicorn_conf
alerts.web:app`` (deploy/systemd/alerts-web.service; docs/deployment.md).

- **No token in a log.** The links' tokens (``/unsubscribe/<token>``, ``/preferences/<token>``)
  are secrets: whoever holds one can change that subscription. The access log's request
  line and path, and every message of the error log (gunicorn's own "Error handling
  request /unsubscribe/…" included), have them cut out (``redact_path``), percent-escapes
  decoded first, so another spelling of the path does not slip through.
- **Timeouts that outlast the longest request.** gunicorn kills a worker that stays silent
  for ``timeout`` seconds — a sync worker is silent for the whole of a request. The
  longest request the app holds is a one-click unsubscribe waiting for a send in flight
  (``IN_FLIGHT_WAIT_SECONDS``) between transactions that may each wait up to
  ``DB_CONNECT_TIMEOUT_SECONDS`` for a connection; a graceful stop lets it finish too.

Settings given on the command line win over these.
"""
from __future__ import annotations

import logging
from urllib.parse import unquote

from gunicorn.glogging import Logger

from alerts.subscribers.unsubscribe import IN_FLIGHT_WAIT_SECONDS
from alerts.web import DB_CONNECT_TIMEOUT_SECONDS
from alerts.web.common import redact_path

# The wait, and the transactions before and after it (unsubscribe, the last skip).
LONGEST_REQUEST_SECONDS = int(IN_FLIGHT_WAIT_SECONDS + 3 * DB_CONNECT_TIMEOUT_SECONDS)


def _redacted(value):
    """A string with the tokens cut out, percent-escapes decoded first (``/%75nsubscribe/…``
    is the same page); anything else as it is."""
    if not isinstance(value, str):
        return value
    return redact_path(unquote(value) if "%" in value else value)


class _RedactTokens(logging.Filter):
    """Cuts the tokens out of a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _redacted(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redacted(value) for key, value in record.args.items()}
        return True


class RedactingLogger(Logger):
    """gunicorn's logger, writing no token to the access or the error log."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            if not any(isinstance(f, _RedactTokens) for f in log.filters):
                log.addFilter(_RedactTokens())

    def atoms(self, resp, req, environ, request_time) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        path = redact_path(environ.get("PATH_INFO") or "")
        query = environ.get("QUERY_STRING")
        uri = f"{path}?{query}" if query else path
        atoms.update({"r": f"{environ.get('REQUEST_METHOD')} {uri} {environ.get('SERVER_PROTOCOL')}", "U": path,
                      "{raw_uri}e": uri})
        return {name: _redacted(value) for name, value in atoms.items()}


logger_class = RedactingLogger
timeout = 2 * LONGEST_REQUEST_SECONDS
graceful_timeout = LONGEST_REQUEST_SECONDS + 5
