"""``GET /metrics``: the database's view of the queues for Prometheus (what is exported:
alerts/operations/metrics.py; docs/monitoring.md).

With ``ALERTS_METRICS_TOKEN`` set, only a request with ``Authorization: Bearer <token>``
(the scheme in any case) is answered; any other gets 401 with ``WWW-Authenticate:
Bearer``. The token is compared in constant time. A database that cannot be reached, or
a scrape slower than its statement timeout, is a 503: Prometheus records the scrape as
failed (``up == 0``) rather than stale numbers.
"""
from __future__ import annotations

import hmac
import logging
from datetime import datetime, timezone

import sqlalchemy as sa
from flask import Blueprint, Response, request
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from alerts.operations.metrics import DatabaseCollector
from alerts.web.common import context

log = logging.getLogger(__name__)

blueprint = Blueprint("metrics", __name__)

TEXT = "text/plain; charset=utf-8"


def authorized(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, the scheme matched in any case (RFC 9110 §11.1)."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


@blueprint.get("/metrics")
def metrics():
    ctx = context()
    token = ctx.settings.metrics_token
    if token is not None and not authorized(request.headers.get("Authorization"), token):
        return Response("unauthorized\n", 401, {"WWW-Authenticate": "Bearer"}, content_type=TEXT)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(ctx.engine, ctx.settings.sending_lease_seconds,
                                        lambda: datetime.now(timezone.utc)))
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    try:
        body = encode(registry)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        log.error("/metrics: database unreachable or too slow: %s",
                  type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__)
        return Response("database unavailable\n", 503, content_type=TEXT)
    return Response(body, 200, content_type=content_type)
