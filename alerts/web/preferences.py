"""The preferences page behind every email's "Manage alerts" link (the logic is
alerts/subscribers/preferences.py; what each setting does: docs/subscribers.md).

    GET  /preferences/<token>   the page: channels, subscriptions, digest and quiet hours;
                                changes nothing
    POST /preferences/<token>   its form, from our own page only (alerts/web/same_origin.py):
                                saved in one transaction and shown again; invalid input is
                                shown next to its field and nothing is saved (400)

A malformed, altered or forged token, or one of a user since deleted, gets 400; so does
an expired one, with a page that says where to find a fresh link.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, make_response, render_template, request

from alerts.core import tokens
from alerts.messages.render import SEVERITY_LABELS
from alerts.subscribers import preferences as prefs
from alerts.web import same_origin
from alerts.web.common import context

log = logging.getLogger(__name__)

blueprint = Blueprint("preferences", __name__)

INVALID = ("This link to your alert preferences is not valid. Please use the “Manage alerts” link from one of "
           "our emails as it is.")
EXPIRED = ("This link to your alert preferences has expired. Every email we send carries a fresh “Manage alerts” "
           "link: please use the one in a recent email.")
SAVED = "Your changes are saved. They apply to alerts from now on."
NOT_SAVED = "Nothing was saved: please correct what is marked below."
# The form has five fields per subscription: room for a few hundred (the app's own cap,
# for the one-field forms of the other pages, is far smaller).
FORM_MAX_BYTES = 64 * 1024
_CHOICES_KEY = "alerts.preferences_choices"


def _user(token: str, now: datetime) -> int:
    try:
        return tokens.read_preferences_token(context().secret_key, token, now)
    except tokens.ExpiredToken:
        _refuse("This link has expired", EXPIRED)
    except tokens.BadToken:
        _refuse("This link is not valid", INVALID)


def _refuse(heading: str, message: str):
    abort(make_response(render_template("error.html", heading=heading, message=message), 400))


def _choices(conn, now: datetime):
    """The alert types and regions offered for a new subscription, read at most once per
    CHOICES_TTL per process (they change slowly; reading them scans 90 days of events)."""
    kept = current_app.extensions.get(_CHOICES_KEY)
    if kept is None or not kept[0] <= now < kept[0] + prefs.CHOICES_TTL:
        kept = (now, prefs.event_choices(conn, now))
        current_app.extensions[_CHOICES_KEY] = kept
    return kept[1]


def _page(conn, user_id: int, now: datetime) -> prefs.Page:
    page = prefs.load(conn, user_id, context().settings, now, _choices(conn, now))
    if page is None:  # a valid token of a user since deleted
        _refuse("This link is not valid", INVALID)
    return page


def _render(page: prefs.Page, token: str, now: datetime, *, form=None, errors=None, status: str | None = None):
    settings = context().settings
    return render_template(
        "preferences.html", page=page, form=form, errors=errors or {}, status=status, p=prefs,
        form_token=same_origin.form_token(token), form_token_field=same_origin.FIELD,
        severities=prefs.severity_choices(), severity_labels=SEVERITY_LABELS, time_zones=prefs.time_zones(),
        connect_link=prefs.connect_link(page, settings, now))


@blueprint.get("/preferences/<token>")
def preferences_page(token: str):
    now = datetime.now(timezone.utc)
    user_id = _user(token, now)
    with context().engine.connect() as conn:
        page = _page(conn, user_id, now)
    return _render(page, token, now)


@blueprint.post("/preferences/<token>")
def preferences_post(token: str):
    now = datetime.now(timezone.utc)
    user_id = _user(token, now)
    request.max_content_length = request.max_form_memory_size = FORM_MAX_BYTES
    same_origin.require_same_origin(token)
    engine = context().engine
    try:
        with engine.begin() as conn:  # read, check and save in one transaction
            page = _page(conn, user_id, now)
            changes, errors = prefs.read_form(page, request.form)
            if not errors:
                prefs.save(conn, page, changes, now)
    except sa.exc.IntegrityError:  # the same subscription added meanwhile (another tab)
        errors = {prefs.NEW_TYPE: "You already have this subscription: change that one instead."}
    if errors:
        return _render(page, token, now, form=request.form, errors=errors, status=NOT_SAVED), 400
    log.info("user %s saved their preferences: %s", user_id, _summary(changes))
    with engine.connect() as conn:
        page = _page(conn, user_id, now)
    return _render(page, token, now, status=SAVED)


def _summary(changes: prefs.Changes) -> str:
    """What changed, without values a log should not hold (no addresses)."""
    parts = [f"{len(changes.removed)} removed", f"{len(changes.updated)} changed", f"{len(changes.added)} added"]
    parts += [f"{c} off" for c in changes.channels_off] + [f"{c} on" for c in changes.channels_on]
    parts += sorted(changes.user)
    return ", ".join(parts)
