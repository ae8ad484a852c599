"""``alerts explain --user U --event E``: why that user did or did not get that event, on
every channel — each decision on the path from the event to a message, read back from
the tables the pipeline writes (docs/support.md):

    event          its status: not validated yet, rejected (and why), waiting for the
                   fan-out, or fanned out (when: every delivery of one event is made by
                   one fan-out, so any of them carries the time)
    subscriptions  each of the user's preferences and whether it matches the event:
                   alert type, region, minimum severity, enabled, the user active
    channels       per channel: the delivery (kind, status, attempts, last error), and
                   what it says — held by quiet hours until, superseded by a newer event
                   of its story, skipped for a blocked destination or an unsubscribe,
                   waiting for a retry, stuck in a send; for a digest delivery the digest
                   it joined (window, status, sent_at), or the window it will join; and
                   when there is no delivery, why not

Nothing is logged for this: every answer comes from the rows as they are. A handful of
indexed look-ups (primary keys, the unique (user, event, channel) of deliveries, the
digest item of a delivery), so it costs the same on a million deliveries as on ten
(bench/bench_explain.py).

What the rows cannot tell is said as such: a delivery that was held by quiet hours and
sent since keeps no trace of the hold (its ``sent_at`` shows when it went); a
subscription changed after the fan-out is judged as it is now.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from alerts.core import tables as m
from alerts.core.settings import Settings
from alerts.messages import severity_label, window_label
from alerts.operations.status import printable
from alerts.policy.windows import digest_window, resolve_period, resolve_send_time, resolve_timezone
from alerts.sending import blocks

ANY = "*"
_SUPERSEDED = re.compile(re.escape(m.SUPERSEDED_BY) + r"(\d+)\Z")
_DISABLED = m.DESTINATION_DISABLED + ": "


class Unknown(LookupError):
    """No such user or event; ``option`` names the command-line option."""

    def __init__(self, option: str, what: str, row_id: int):
        super().__init__(f"{option}: no {what} with id {row_id}")
        self.option = option


# --- reading ----------------------------------------------------------------------------------

def explain(conn: Connection, user_id: int, event_id: int, settings: Settings, now: datetime) -> dict:
    """The whole explanation as one JSON-ready dict (times as ISO 8601 text in UTC)."""
    user = _one(conn, m.users, user_id)
    if user is None:
        raise Unknown("--user", "user", user_id)
    event = _one(conn, m.alert_events, event_id)
    if event is None:
        raise Unknown("--event", "event", event_id)
    prefs = _prefs(conn, user_id)
    deliveries = {row["channel"]: row for row in _deliveries(conn, user_id, event_id)}
    user_blocks = {row["channel"]: row for row in _blocks(conn, user_id)}
    fanned_out_at = _fanned_out_at(conn, event, deliveries)
    tz = resolve_timezone(user["timezone"], settings)
    subscriptions = [_subscription(p, user, event) for p in prefs]
    channels = [
        _channel(conn, channel, user, event, fanned_out_at, [s for s in subscriptions if s["channel"] == channel],
                 [p for p in prefs if p["channel"] == channel], deliveries.get(channel), user_blocks.get(channel),
                 settings, tz, now)
        for channel in m.CHANNELS]
    return {
        "now": _iso(now),
        "user": {"id": user["id"], "active": user["is_active"], "email": user["email"],
                 "telegram_chat_id": user["telegram_chat_id"], "phone": user["phone"], "plan": user["plan"],
                 "timezone": tz.key, "quiet_hours": user["quiet_hours"],
                 "digest_period": resolve_period(user["digest_period"], user["plan"], settings),
                 "digest_send_time": f"{resolve_send_time(user['digest_send_time'], settings):%H:%M}"},
        "event": {"id": event["id"], "event_key": event["event_key"], "alert_type": event["alert_type"],
                  "region": event["region"], "severity": event["severity"],
                  "severity_label": severity_label(event["severity"]), "title": event["title"],
                  "collapse_key": event["collapse_key"], "created_at": _iso(event["created_at"]),
                  "status": event["status"], "reject_reason": event["reject_reason"],
                  "fanned_out_at": _iso(fanned_out_at), "verdict": _event_verdict(event, fanned_out_at)},
        "subscriptions": subscriptions,
        "channels": channels,
    }


def _one(conn: Connection, table: sa.Table, row_id: int) -> Mapping | None:
    return conn.execute(sa.select(table).where(table.c.id == row_id)).mappings().first()


def _prefs(conn: Connection, user_id: int) -> list[Mapping]:
    p = m.user_alert_prefs
    rows = conn.execute(sa.select(p).where(p.c.user_id == user_id).order_by(p.c.id)).mappings()
    return sorted(rows, key=lambda row: (m.CHANNELS.index(row["channel"]), row["id"]))


def _deliveries(conn: Connection, user_id: int, event_id: int) -> list[Mapping]:
    """The user's deliveries of the event (one per channel), each with its digest, if any."""
    d, i, g = m.user_alert_deliveries, m.user_alert_digest_items, m.user_alert_digests
    counted = i.alias("counted")
    items = sa.select(sa.func.count()).select_from(counted).where(counted.c.digest_id == g.c.id).scalar_subquery()
    query = (sa.select(d, g.c.id.label("digest_id"), g.c.period.label("digest_period"),
                       g.c.window_start.label("digest_window_start"), g.c.window_end.label("digest_window_end"),
                       g.c.sequence.label("digest_sequence"), g.c.status.label("digest_status"),
                       g.c.attempts.label("digest_attempts"), g.c.next_retry_at.label("digest_next_retry_at"),
                       g.c.last_error.label("digest_last_error"), g.c.sent_at.label("digest_sent_at"),
                       g.c.claimed_at.label("digest_claimed_at"), items.label("digest_items"))
             .select_from(d.outerjoin(i, i.c.delivery_id == d.c.id).outerjoin(g, g.c.id == i.c.digest_id))
             .where(d.c.user_id == user_id, d.c.alert_event_id == event_id))
    return list(conn.execute(query).mappings())


def _blocks(conn: Connection, user_id: int) -> list[Mapping]:
    """The user's blocks, each with whether it still holds (its address is the current one)."""
    b, u = m.user_channel_blocks, m.users
    holds = sa.case((b.c.address == blocks.current_address(b.c.channel), sa.true()), else_=sa.false())
    return list(conn.execute(sa.select(b, holds.label("in_force")).select_from(b.join(u, u.c.id == b.c.user_id))
                             .where(b.c.user_id == user_id)).mappings())


def _fanned_out_at(conn: Connection, event: Mapping, deliveries: dict) -> datetime | None:
    """When the event was fanned out: one fan-out makes all of an event's deliveries, with
    one ``created_at``. None when nobody got a delivery (or it is not fanned out)."""
    if event["status"] != "fanned_out":
        return None
    if deliveries:
        return next(iter(deliveries.values()))["created_at"]
    d = m.user_alert_deliveries
    return conn.execute(sa.select(d.c.created_at).where(d.c.alert_event_id == event["id"]).limit(1)).scalar()


# --- judging -----------------------------------------------------------------------------------

def _event_verdict(event: Mapping, fanned_out_at: datetime | None) -> str:
    status = event["status"]
    if status == "new":
        return "new: not validated yet (phase A, intake, has not run since it was stored)"
    if status == "ready":
        return "ready: validated, not fanned out yet (phase B has not run since)"
    if status == "rejected":
        return f"rejected by intake: {printable(event['reject_reason'])}"
    return f"fanned out at {_when(fanned_out_at)}" if fanned_out_at else "fanned out (to nobody)"


def _subscription(pref: Mapping, user: Mapping, event: Mapping) -> dict:
    why_not = []
    if pref["alert_type"] not in (ANY, event["alert_type"]):
        why_not.append(f"alert type {pref['alert_type']!r}, the event's is {event['alert_type']!r}")
    if pref["region"] != ANY and pref["region"] != event["region"]:
        shown = "none" if event["region"] is None else repr(event["region"])
        why_not.append(f"region {pref['region']!r}, the event's is {shown}")
    if event["severity"] < pref["min_severity"]:
        why_not.append(f"minimum severity {pref['min_severity']} ({severity_label(pref['min_severity'])}), "
                       f"the event's is {event['severity']} ({severity_label(event['severity'])})")
    if not pref["enabled"]:
        why_not.append("disabled" + (f" by an unsubscribe at {_when(pref['unsubscribed_at'])}"
                                     if pref.get("unsubscribed_at") else ""))
    if not user["is_active"]:
        why_not.append("the user is inactive")
    return {"id": pref["id"], "channel": pref["channel"], "alert_type": pref["alert_type"], "region": pref["region"],
            "min_severity": pref["min_severity"], "delivery_kind": pref["delivery_kind"], "enabled": pref["enabled"],
            "created_at": _iso(pref["created_at"]), "matched": not why_not, "not_matched_because": why_not}


def _channel(conn: Connection, channel: str, user: Mapping, event: Mapping, fanned_out_at: datetime | None,
             subscriptions: list[dict], prefs: list[Mapping], delivery: Mapping | None, block: Mapping | None,
             settings: Settings, tz, now: datetime) -> dict:
    matched = [s for s in subscriptions if s["matched"]]
    kind, why_kind = _kind(channel, matched, event, settings)
    unsubscribed = bool(prefs) and not any(p["enabled"] for p in prefs)
    since = max((p["unsubscribed_at"] for p in prefs if p.get("unsubscribed_at")), default=None)
    out = {
        "channel": channel,
        "address": user[m.RECIPIENT_COLUMNS[channel]],
        "subscriptions_matched": [s["id"] for s in matched],
        "matched_kind": kind,  # what a fan-out now would make of the matches (None: nothing)
        "matched_kind_because": why_kind,
        "block": None if block is None else {"address": block["address"], "reason": block["reason"],
                                             "since": _iso(block["created_at"]), "in_force": bool(block["in_force"])},
        "unsubscribed": {"since": _iso(since)} if unsubscribed else None,
        "delivery": None if delivery is None else _delivery(conn, delivery, event, user, settings, tz, now),
    }
    if delivery is None:
        out["delivered"], out["outcome"] = False, _no_delivery(channel, event, fanned_out_at, subscriptions, prefs)
    else:
        out["delivered"], out["outcome"] = _outcome(out["delivery"], now, settings, tz)
    return out


def _kind(channel: str, matched: list[dict], event: Mapping, settings: Settings) -> tuple[str | None, str | None]:
    """The kind of delivery the matching subscriptions make, as phase B decides it."""
    if not matched:
        return None, None
    kinds = {s["delivery_kind"] for s in matched}
    if m.INSTANT in kinds:
        return m.INSTANT, ("an instant subscription wins over a digest one" if m.DIGEST in kinds else None)
    bypass = settings.digest_bypass_severity
    if bypass is not None and event["severity"] >= bypass:
        return m.INSTANT, f"severity {event['severity']} >= ALERTS_DIGEST_BYPASS_SEVERITY ({bypass}) skips the digest"
    if channel == "sms":
        return m.DIGEST, "SMS has no digest: the delivery is skipped (sms_digest_not_supported)"
    return m.DIGEST, None


def _delivery(conn: Connection, row: Mapping, event: Mapping, user: Mapping, settings: Settings, tz,
              now: datetime) -> dict:
    last_error = row["last_error"] or ""
    superseded = _SUPERSEDED.match(last_error)
    held = (row["delivery_kind"] == m.INSTANT and row["status"] == m.QUEUED and row["attempts"] == 0
            and not last_error and row["next_retry_at"] is not None and row["next_retry_at"] > row["created_at"])
    out = {
        "id": row["id"], "kind": row["delivery_kind"], "status": row["status"], "attempts": row["attempts"],
        "last_error": row["last_error"], "created_at": _iso(row["created_at"]),
        "next_retry_at": _iso(row["next_retry_at"]), "claimed_at": _iso(row["claimed_at"]),
        "sent_at": _iso(row["sent_at"]),
        # Phase B creates an instant delivery held by quiet hours due at the end of the period:
        # queued, never attempted, due after it was made. Nothing else makes such a row.
        "held_by_quiet_hours_until": _iso(row["next_retry_at"]) if held else None,
        "superseded_by": _superseding(conn, row, int(superseded.group(1))) if superseded else None,
        "blocked": last_error[len(_DISABLED):] if last_error.startswith(_DISABLED) else None,
        "unsubscribed": last_error == m.UNSUBSCRIBED,
        "digest": None,
        "digest_window": None,
    }
    if row["digest_id"] is not None:
        out["digest"] = {
            "id": row["digest_id"], "period": row["digest_period"], "sequence": row["digest_sequence"],
            "window_start": _iso(row["digest_window_start"]), "window_end": _iso(row["digest_window_end"]),
            "window": window_label(row["digest_window_start"], row["digest_window_end"], tz),
            "status": row["digest_status"], "attempts": row["digest_attempts"],
            "next_retry_at": _iso(row["digest_next_retry_at"]), "last_error": row["digest_last_error"],
            "claimed_at": _iso(row["digest_claimed_at"]), "sent_at": _iso(row["digest_sent_at"]),
            "items": row["digest_items"]}
    elif row["delivery_kind"] == m.DIGEST and row["status"] == m.QUEUED:
        out["digest_window"] = _pending_window(event, user, settings, tz)
    return out


def _superseding(conn: Connection, row: Mapping, newer_event_id: int) -> dict:
    """The newer event of the story, and what became of the user's delivery of it."""
    d = m.user_alert_deliveries
    newer = conn.execute(sa.select(d.c.id, d.c.status, d.c.sent_at, d.c.last_error).where(
        d.c.user_id == row["user_id"], d.c.alert_event_id == newer_event_id, d.c.channel == row["channel"])).first()
    return {"event_id": newer_event_id, "delivery_id": newer.id if newer else None,
            "status": newer.status if newer else None, "sent_at": _iso(newer.sent_at) if newer else None,
            "last_error": newer.last_error if newer else None}


def _pending_window(event: Mapping, user: Mapping, settings: Settings, tz) -> dict:
    """The window a pending digest delivery joins when the digest build (phase D) runs."""
    period = resolve_period(user["digest_period"], user["plan"], settings)
    start, end = digest_window(event["created_at"], period, tz, resolve_send_time(user["digest_send_time"], settings))
    return {"period": period, "window_start": _iso(start), "window_end": _iso(end),
            "window": window_label(start, end, tz)}


def _no_delivery(channel: str, event: Mapping, fanned_out_at: datetime | None, subscriptions: list[dict],
                 prefs: list[Mapping]) -> str:
    status = event["status"]
    if status == "rejected":
        return "no delivery: the event was rejected by intake"
    if status in ("new", "ready"):
        return "no delivery yet: the event has not been fanned out"
    if not subscriptions:
        return f"no delivery: no subscription on {channel}"
    matched = [s for s in subscriptions if s["matched"]]
    if not matched:
        return f"no delivery: none of the {len(subscriptions)} subscription(s) on {channel} matches"
    ids = ", ".join(f"#{s['id']}" for s in matched)
    created = {p["id"]: p["created_at"] for p in prefs}
    if fanned_out_at is not None and all(created[s["id"]] > fanned_out_at for s in matched):
        return (f"no delivery: subscription {ids} matches, but was created after the event was fanned out "
                f"({_when(fanned_out_at)})")
    when = f" ({_when(fanned_out_at)})" if fanned_out_at else ""
    return (f"no delivery: subscription {ids} matches now, but did not when the event was fanned out{when}: "
            "it (or the user) was changed since")


def _outcome(delivery: dict, now: datetime, settings: Settings, tz) -> tuple[bool | None, str]:
    """(delivered: True, False, or None while it may still go out; the one line)."""
    status, error, attempts = delivery["status"], delivery["last_error"], delivery["attempts"]
    digest = delivery["digest"]
    if digest is not None:
        return _digest_outcome(digest, now, settings)
    if delivery["kind"] == m.DIGEST and status == m.QUEUED:
        w = delivery["digest_window"]
        return None, f"waiting for the digest build: joins the {w['period']} digest of {w['window']}"
    if status == m.SENT:
        return True, f"sent at {_when(_dt(delivery['sent_at']))}" + _after(attempts)
    if status == m.SENDING:
        return None, _sending(delivery["claimed_at"], now, settings)
    if status == m.FAILED:
        return False, f"failed{_after(attempts)}: {printable(error)}"
    if status == m.SKIPPED:
        return False, "skipped: " + _skip_reason(delivery)
    held = delivery["held_by_quiet_hours_until"]
    if held is not None:
        until = _dt(held)
        shown = f"{_when(until)} ({until.astimezone(tz):%H:%M} {tz.key})"
        return None, (f"held by quiet hours until {shown}" if until > now
                      else f"held by quiet hours until {shown}; due since then, waiting for a sender")
    due = _dt(delivery["next_retry_at"]) or _dt(delivery["created_at"])
    if attempts:
        wait = f"retry due at {_when(due)}" if due > now else f"retry due since {_when(due)}, waiting for a sender"
        return None, f"queued after {attempts} failed attempt(s) ({printable(error)}): {wait}"
    return None, f"queued, due since {_when(due)}: waiting for a sender"


def _digest_outcome(digest: dict, now: datetime, settings: Settings) -> tuple[bool | None, str]:
    head = f"in {digest['period']} digest #{digest['id']} ({digest['window']}, {digest['items']} item(s))"
    status = digest["status"]
    if status == m.SENT:
        return True, f"{head}: sent at {_when(_dt(digest['sent_at']))}"
    if status == m.SENDING:
        return None, f"{head}: {_sending(digest['claimed_at'], now, settings)}"
    if status == m.FAILED:
        return False, f"{head}: failed{_after(digest['attempts'])}: {printable(digest['last_error'])}"
    if status == m.SKIPPED:
        return False, f"{head}: skipped: {printable(digest['last_error'])}"
    due = _dt(digest["next_retry_at"])
    if digest["attempts"]:
        return None, (f"{head}: queued after {digest['attempts']} failed attempt(s) "
                      f"({printable(digest['last_error'])}), retry due at {_when(due)}")
    if due is not None and due > now:
        return None, f"{head}: queued, goes out when its window closes at {_when(due)}"
    return None, f"{head}: queued, due since {_when(due)}: waiting for a sender"


def _sending(claimed_at: str | None, now: datetime, settings: Settings) -> str:
    claimed = _dt(claimed_at)
    if claimed is not None and now - claimed > timedelta(seconds=settings.sending_lease_seconds):
        return (f"stuck in sending since {_when(claimed)}, past the {settings.sending_lease_seconds}s lease: "
                "the next recovery puts it back in the queue")
    return f"being sent (claimed at {_when(claimed)})"


def _skip_reason(delivery: dict) -> str:
    error = delivery["last_error"] or ""
    newer = delivery["superseded_by"]
    if newer is not None:
        if newer["delivery_id"] is None:
            return f"superseded by #{newer['event_id']}, a newer event of the same story"
        fate = f"sent at {_when(_dt(newer['sent_at']))}" if newer["status"] == m.SENT else newer["status"]
        return (f"superseded by #{newer['event_id']}, a newer event of the same story "
                f"(its delivery #{newer['delivery_id']}: {fate})")
    if delivery["blocked"] is not None:
        return f"the destination is blocked ({printable(delivery['blocked'])})"
    if delivery["unsubscribed"]:
        return "the user unsubscribed from this channel"
    if error == m.USER_INACTIVE:
        return "the user is inactive"
    return printable(error) or "(no reason recorded)"


def _after(attempts: int) -> str:
    return f" after {attempts} attempts" if attempts > 1 else ""


# --- showing ----------------------------------------------------------------------------------------

def render(report: dict) -> str:
    """The explanation for a terminal."""
    user, event = report["user"], report["event"]
    lines = [
        f"user {user['id']}" + ("" if user["active"] else " (inactive)") + f", time zone {user['timezone']}"
        + (f", quiet hours {user['quiet_hours']}" if user["quiet_hours"] else "")
        + f", {user['digest_period']} digests" + (f" at {user['digest_send_time']}"
                                                 if user["digest_period"] == m.DAILY else ""),
        f"event #{event['id']} {printable(event['event_key'])}: {printable(event['alert_type'])}"
        f" · region {printable(event['region']) if event['region'] is not None else '(none)'}"
        f" · severity {event['severity']}" + (f" ({event['severity_label']})" if 1 <= event["severity"] <= 5 else "")
        + (f" · story {printable(event['collapse_key'])}" if event["collapse_key"] else ""),
        f"  {printable(event['title']) or '(no title)'}",
        f"  created {_when(_dt(event['created_at']))}; {event['verdict']}",
        "",
        "subscriptions:" if report["subscriptions"] else "subscriptions: none",
    ]
    for s in report["subscriptions"]:
        judged = "matches" if s["matched"] else "does not match: " + "; ".join(map(printable, s["not_matched_because"]))
        lines.append(f"  #{s['id']} {s['channel']} {s['delivery_kind']}: type {printable(s['alert_type'])}, "
                     f"region {printable(s['region'])}, severity >= {s['min_severity']}"
                     + ("" if s["enabled"] else ", disabled") + f" — {judged}")
    for c in report["channels"]:
        lines += ["", f"{c['channel']} ({printable(c['address']) if c['address'] else 'no address'}): {c['outcome']}"]
        if c["matched_kind"] is not None:
            lines.append("  matched: " + ", ".join(f"#{i}" for i in c["subscriptions_matched"])
                         + f" → {c['matched_kind']}" + (f" ({c['matched_kind_because']})"
                                                        if c["matched_kind_because"] else ""))
        d = c["delivery"]
        if d is not None:
            lines.append(f"  delivery #{d['id']}: {d['kind']}, {d['status']}, {d['attempts']} attempt(s), "
                         f"created {_when(_dt(d['created_at']))}"
                         + (f", last error: {printable(d['last_error'])}" if d["last_error"] else ""))
            if c["matched_kind"] not in (None, d["kind"]):
                lines.append(f"  (made {d['kind']} at the fan-out: the subscriptions or settings have changed since)")
        if c["block"] is not None:
            b = c["block"]
            state = "in force" if b["in_force"] else "not in force: the address has changed since"
            lines.append(f"  blocked since {_when(_dt(b['since']))} ({state}) for {printable(b['address'])}: "
                         f"{printable(b['reason'])}")
        if c["unsubscribed"] is not None:
            since = c["unsubscribed"]["since"]
            lines.append("  unsubscribed: every subscription on this channel is off"
                         + (f" (since {_when(_dt(since))})" if since else ""))
    return "\n".join(lines)


# --- time ---------------------------------------------------------------------------------------------

def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if value is not None else "?"
