"""One-click unsubscribe pages (RFC 8058; the transaction is alerts/subscribers/unsubscribe.py).

    GET  /unsubscribe/<token>   a page naming the channel and the masked address, with a
                                button that confirms; changes nothing (mail scanners
                                follow links)
    POST /unsubscribe/<token>   List-Unsubscribe=One-Click (RFC 8058, also the page's
                                button): unsubscribe at once, from anywhere (RFC 8058);
                                action=resubscribe: turn back on the preferences the
                                unsubscribe turned off — from our own page only
                                (alerts/web/same_origin.py)
"""
from __future__ import annotations

import logging

from flask import Blueprint, abort, render_template, request

from alerts.core import tokens
from alerts.subscribers import unsubscribe as unsub
from alerts.web import same_origin
from alerts.web.common import INVALID_LINK, context

log = logging.getLogger(__name__)

blueprint = Blueprint("unsubscribe", __name__)

IN_FLIGHT_RETRY_AFTER_SECONDS = 60
CHANNEL_LABELS = {"email": "email", "telegram": "Telegram", "sms": "SMS"}
ONE_CLICK = ("List-Unsubscribe", "One-Click")


def subscriber(token: str) -> unsub.Subscriber:
    try:
        user_id, channel = tokens.read_token(context().secret_key, token)
    except tokens.BadToken:
        abort(400, INVALID_LINK)
    with context().engine.connect() as conn:
        found = unsub.find(conn, user_id, channel)
    if found is None:  # a valid token of a user since deleted: nothing to change
        abort(400, INVALID_LINK)
    return found


def page(template: str, who: unsub.Subscriber, token: str) -> str:
    return render_template(template, channel_label=CHANNEL_LABELS[who.channel], subscribed=who.subscribed,
                           address=unsub.mask_address(who.channel, who.address),
                           form_token_field=same_origin.FIELD, form_token=same_origin.form_token(token))


@blueprint.get("/unsubscribe/<token>")
def unsubscribe_page(token: str):
    return page("unsubscribe.html", subscriber(token), token)


@blueprint.post("/unsubscribe/<token>")
def unsubscribe_post(token: str):
    who, engine = subscriber(token), context().engine
    form = request.form
    if form.get("action") == "resubscribe":
        same_origin.require_same_origin(token)
        with engine.begin() as conn:
            unsub.resubscribe(conn, who.user_id, who.channel)
        log.info("user %s resubscribed on %s", who.user_id, who.channel)
        return page("resubscribed.html", who, token)
    if form.get(ONE_CLICK[0]) != ONE_CLICK[1]:
        abort(400, "An unsubscribe is a POST of List-Unsubscribe=One-Click (or action=resubscribe).")
    counts = unsub.unsubscribe_committed(engine, who.user_id, who.channel)
    log.info("user %s unsubscribed on %s: %s", who.user_id, who.channel, counts)
    if not unsub.wait_in_flight(engine, who.user_id, who.channel):
        # Committed, but a message of theirs may still be on its way: no 200 until
        # nothing can arrive after it. Repeating the POST is harmless.
        body = render_template("error.html", heading="Almost done", message=(
            "Your unsubscribe is recorded. A message that was already being sent may still arrive; "
            "nothing after it will. Please try again in a minute to confirm."))
        return body, 503, {"Retry-After": str(IN_FLIGHT_RETRY_AFTER_SECONDS)}
    return page("unsubscribed.html", who, token)
