"""Same-origin writes: what every POST that turns something on or changes it (the
preferences form, resubscribe) must show before it changes anything. Unsubscribing is
not guarded: RFC 8058 wants it possible from anywhere.

Two checks, both needed (docs/subscribers.md, "Why these links are safe"):

1. **The browser's word** (``cross_site``): a ``Sec-Fetch-Site`` other than
   ``same-origin`` or ``none`` is refused; a browser that sends none is judged by its
   ``Origin``, which must be ``ALERTS_PUBLIC_URL``'s or ``null`` (Chromium sends
   ``null`` for a same-origin post from a ``no-referrer`` page, as ours are). A client
   that sends neither header (not a browser) passes on to the second check.
2. **The form's anti-forgery field** (``FIELD``): an itsdangerous signature, under a salt
   of its own, over the page's token and the time the form was made. A page of another
   site cannot read it (our pages allow no framing and no cross-origin reads), a form
   of one link does not verify on another link's page, and it lapses after
   ``FORM_MAX_AGE``. Stateless: no session, no cookie, nothing stored.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from typing import Mapping
from urllib.parse import urlsplit

import itsdangerous
from flask import abort, make_response, render_template, request

from alerts.web.common import context

FIELD = "form_token"
FORM_SALT = "alerts.form.v1"
FORM_MAX_AGE = timedelta(hours=24)
ALLOWED_FETCH_SITES = ("same-origin", "none")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _serializer(secret_key: str, page_token: str) -> itsdangerous.URLSafeSerializer:
    # The page's token is part of the salt: a form made for one link verifies on no other.
    return itsdangerous.URLSafeSerializer(secret_key, salt=f"{FORM_SALT}:{page_token}",
                                          signer_kwargs={"digest_method": hashlib.sha256})


def make_form_token(secret_key: str, page_token: str, now: datetime) -> str:
    return _serializer(secret_key, page_token).dumps(int(now.timestamp()))


def form_token_problem(secret_key: str, page_token: str, value: str | None, now: datetime) -> str | None:
    """Why ``value`` is not a good anti-forgery field for this page, or None when it is."""
    if not value:
        return "missing"
    try:
        made = _serializer(secret_key, page_token).loads(value)
    except itsdangerous.BadData:
        return "forged"
    if type(made) is not int:  # noqa: E721
        return "forged"
    if now - datetime.fromtimestamp(made, timezone.utc) > FORM_MAX_AGE:
        return "expired"
    return None


def origin_of(url: str) -> str:
    """The origin a browser would send for pages under ``url`` (scheme://host[:port])."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    port = parts.port
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{scheme}://{host}:{port}"


def cross_site(headers: Mapping[str, str], public_url: str | None) -> str | None:
    """Why the browser says this request comes from another site, or None when it does not."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        site = site.strip().lower()
        return None if site in ALLOWED_FETCH_SITES else f"Sec-Fetch-Site: {site[:40]}"
    origin = headers.get("Origin")
    if origin is None or origin.strip() == "null":
        return None
    if public_url and origin.strip().lower().rstrip("/") == origin_of(public_url):
        return None
    return "Origin is not ours"


def form_token(page_token: str) -> str:
    """The anti-forgery field for a form on the page of ``page_token``, made now."""
    return make_form_token(context().secret_key, page_token, datetime.now(timezone.utc))


def require_same_origin(page_token: str) -> None:
    """Abort with 403 (nothing changed) unless this POST comes from our own page."""
    problem = cross_site(request.headers, context().settings.public_url)
    if problem is not None:
        abort(_refused("This change was sent from another website, so nothing was changed. "
                       "Please make it on the page itself."))
    problem = form_token_problem(context().secret_key, page_token, request.form.get(FIELD),
                                 datetime.now(timezone.utc))
    if problem == "expired":
        abort(_refused("This page was open too long, so nothing was changed. "
                       "Please reload it and make your change again."))
    if problem is not None:
        abort(_refused("This change did not come from our page, so nothing was changed. "
                       "Please reload the page and make your change there."))


def _refused(message: str):
    return make_response(render_template("error.html", heading="Nothing was changed", message=message), 403)
