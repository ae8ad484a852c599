"""The soak's end-of-run invariant check (tests/system/soak/soak.py): the database, the messages the
fake SMTP server and the fake Telegram API received, and the fault log, checked against
docs/architecture.md.

Destination health (docs/policy.md): a block only for a destination the fake really refuses,
every ``destination_disabled`` skip backed by its block, and no provider request to a
blocked address later than ``IN_FLIGHT_SECONDS`` after the block was committed.

Every problem found is a ``Violation`` (kind, detail). Duplicates are counted per
(channel, recipient, event); a duplicate is excused only as the crash window docs/architecture.md
allows — a worker was SIGKILLed within ``CRASH_WINDOW`` seconds after the provider
accepted the first copy — and is then reported as ``crash_window`` instead.
"""
from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Sequence
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from alerts.core import tables as m
from alerts.messages import digest_message_id

UTC = timezone.utc
EVENT_REF = re.compile(r"(?<!&)#(\d+)\b")  # not "&#34;", an escaped quote
MORE = re.compile(r"…and (\d+) more")
INSTANT_ID = re.compile(r"^<alert-delivery-(\d+)[.@]")  # then the installation's identifier
# A kill counts as the cause of a duplicate when it came at most this long after the
# provider accepted the first copy (the send's DB write follows within milliseconds).
CRASH_WINDOW = (-0.5, 2.0)
KILL_FAULTS = ("worker_kill", "pool_child_kill")
# A claim loaded just before another sender committed a block may still be sent: within a
# batch a sender gives its unsent claims back after half the lease (30 s in the soak), and
# one send lasts at most its timeout (10 s). Later than this, a request is a violation.
IN_FLIGHT_SECONDS = 30 / 2 + 10
ANY = "*"


@dataclass
class Violation:
    kind: str
    detail: str


@dataclass
class Arrival:
    """One message a fake provider accepted."""

    channel: str
    recipient: str
    at: float  # time.time()
    events: list[int]
    message_id: str | None = None  # email only
    digest_key: str | None = None  # email only
    more: int = 0  # "…and N more": items left out of a long digest
    row: tuple[str, int] | None = None  # ("delivery"|"digest", id), once mapped


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    duplicates: int = 0
    crash_window: int = 0
    excused: list[str] = field(default_factory=list)  # the crash-window duplicates, described
    lost: int = 0

    def bad(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(kind, detail))


# --- what arrived ----------------------------------------------------------------------------

def email_arrivals(received, times) -> list[Arrival]:
    out = []
    for mail, at in zip(received, times):
        msg = mail.message
        text = msg.get_body(preferencelist=("plain",))
        body = text.get_content() if text is not None else ""
        out.append(Arrival("email", (mail.rcpt_tos[0] if mail.rcpt_tos else "").lower(), at,
                           [int(x) for x in EVENT_REF.findall(body)], more=_more(body),
                           message_id=str(msg["Message-ID"] or "").strip(),
                           digest_key=str(msg["X-Alerts-Digest-Key"]) if msg["X-Alerts-Digest-Key"] else None))
    return out


def telegram_arrivals(messages, times) -> list[Arrival]:
    return [Arrival("telegram", str(msg.chat_id), at, [int(x) for x in EVENT_REF.findall(msg.text)],
                    more=_more(msg.text))
            for msg, at in zip(messages, times)]


def _more(text: str) -> int:
    found = MORE.search(text)
    return int(found.group(1)) if found else 0


# --- the check ----------------------------------------------------------------------------------

def check(conn, produced: dict[str, bool], arrivals: list[Arrival], faults: list[tuple[float, str]],
          hourly_plans: frozenset[str], default_tz: str, default_period: str, *,
          unsubscribes: Sequence[tuple[int, str, float]] = (),
          bypass_severity: int | None = None, quiet_bypass_severity: int = 5) -> Report:
    """``produced``: every event_key a producer sent → whether it is a valid event.
    ``unsubscribes``: (user, channel, time.time() of the POST's 200) of one-click unsubscribes.
    ``bypass_severity`` / ``quiet_bypass_severity``: the workers' ALERTS_DIGEST_BYPASS_SEVERITY
    and ALERTS_QUIET_HOURS_BYPASS_SEVERITY (docs/policy.md)."""
    r = Report()
    users = {u.id: u for u in conn.execute(sa.select(m.users))}
    prefs = conn.execute(sa.select(m.user_alert_prefs)).all()
    events = {e.id: e for e in conn.execute(sa.select(m.alert_events))}
    deliveries = {d.id: d for d in conn.execute(sa.select(m.user_alert_deliveries))}
    digests = {g.id: g for g in conn.execute(sa.select(m.user_alert_digests))}
    items = conn.execute(sa.select(m.user_alert_digest_items)).all()

    _check_events(r, produced, events)
    unsubscribed = {(user, channel): at for user, channel, at in unsubscribes}
    _check_fanout(r, users, prefs, events, deliveries, set(unsubscribed), bypass_severity)
    digest_of = _check_digests(r, users, events, deliveries, digests, items, hourly_plans, default_tz,
                               default_period)
    _check_deliveries(r, deliveries, digests, digest_of)
    _check_policy(r, users, events, deliveries, default_tz, quiet_bypass_severity)
    _check_messages(r, users, events, deliveries, digests, digest_of, arrivals, faults)
    _check_unsubscribes(r, users, unsubscribed, arrivals)
    r.counts.update(events=len(events), deliveries=len(deliveries), digests=len(digests),
                    messages=len(arrivals))
    return r


def check_blocks(r: Report, conn, refused: dict[str, set[str]], requests: dict[str, list[tuple[str, float]]]) -> None:
    """``refused``: per channel, the addresses the fakes were told to refuse as gone;
    ``requests``: per channel, (address, time.time()) of every request the fakes received."""
    blocks = {(b.user_id, b.channel): b for b in conn.execute(sa.select(m.user_channel_blocks))}
    blocked_at: dict[tuple[str, str], float] = {}
    for b in blocks.values():
        r.counts[f"blocks_{b.channel}"] += 1
        if b.address not in refused.get(b.channel, set()):
            r.bad("block_for_healthy_destination", f"user {b.user_id} {b.channel} {b.address}: {b.reason}")
        key = (b.channel, b.address.lower() if b.channel == "email" else b.address)
        blocked_at[key] = min(blocked_at.get(key, b.created_at.timestamp()), b.created_at.timestamp())
    for table in (m.user_alert_deliveries, m.user_alert_digests):
        for row in conn.execute(sa.select(table.c.id, table.c.user_id, table.c.channel, table.c.last_error)
                                .where(table.c.last_error.like(m.DESTINATION_DISABLED + ":%"))):
            r.counts["destination_disabled_skips"] += 1
            b = blocks.get((row.user_id, row.channel))
            if b is None or row.last_error != m.destination_disabled(b.reason):
                r.bad("disabled_without_block", f"{table.name} {row.id}: {row.last_error}")
    late = 0.0
    for channel, log in requests.items():
        for address, at in log:
            key = (channel, address.lower() if channel == "email" else address)
            if key in blocked_at and at > blocked_at[key]:
                r.counts["requests_after_block"] += 1
                late = max(late, at - blocked_at[key])
                if at - blocked_at[key] > IN_FLIGHT_SECONDS:
                    r.bad("sent_after_block", f"{channel} request to {address} {at - blocked_at[key]:.1f}s "
                                              f"after its block was committed")
    r.counts["latest_request_after_block_ms"] = round(late * 1000)


def _check_events(r: Report, produced: dict[str, bool], events: dict) -> None:
    by_key = {e.event_key: e for e in events.values()}
    for key, valid in produced.items():
        e = by_key.get(key)
        if e is None:
            r.lost += 1
            r.bad("event_lost", f"event_key {key} was produced but is not in the database")
        elif valid and e.status != "fanned_out":
            r.lost += e.status in ("new", "ready")
            r.bad("event_not_fanned_out", f"event {e.id} ({key}) is {e.status} {e.reject_reason or ''}")
        elif not valid and (e.status != "rejected" or not e.reject_reason):
            r.bad("bad_event_not_rejected", f"event {e.id} ({key}) is {e.status}")
    extra = set(by_key) - set(produced)
    if extra:
        r.bad("event_unknown", f"{len(extra)} events nobody produced, e.g. {sorted(extra)[:3]}")
    r.counts["events_rejected"] = sum(e.status == "rejected" for e in events.values())


def _check_fanout(r: Report, users, prefs, events, deliveries, unsubscribed: set = frozenset(),
                  bypass_severity: int | None = None) -> None:
    """The deliveries Phase B must have made, worked out independently from the prefs.
    An unsubscribed (user, channel) is left out: its prefs changed during the run (its
    rows are checked by ``_check_deliveries`` and ``_check_unsubscribes``)."""
    expected: dict[tuple[int, int, str], str] = {}
    for e in events.values():
        if e.status != "fanned_out":
            continue
        matched: dict[tuple[int, str], set[str]] = defaultdict(set)
        for p in prefs:
            if (p.enabled and users[p.user_id].is_active and p.alert_type in (ANY, e.alert_type)
                    and p.region in (ANY, e.region) and e.severity >= p.min_severity):
                matched[(p.user_id, p.channel)].add(p.delivery_kind)
        for (user_id, channel), kinds in matched.items():
            bypass = bypass_severity is not None and e.severity >= bypass_severity
            expected[(user_id, e.id, channel)] = "instant" if "instant" in kinds or bypass else "digest"
    expected = {key: kind for key, kind in expected.items() if (key[0], key[2]) not in unsubscribed}
    actual = {(d.user_id, d.alert_event_id, d.channel): d for d in deliveries.values()
              if (d.user_id, d.channel) not in unsubscribed}
    for key in expected.keys() - actual.keys():
        r.lost += 1
        r.bad("delivery_missing", f"no delivery for (user, event, channel) {key}")
    for key in actual.keys() - expected.keys():
        r.bad("delivery_unexpected", f"delivery {actual[key].id} for {key} matches no pref")
    for key in expected.keys() & actual.keys():
        if actual[key].delivery_kind != expected[key]:
            r.bad("delivery_kind", f"delivery {actual[key].id} is {actual[key].delivery_kind}, "
                                   f"expected {expected[key]}")


def _window_ok(period: str, tz: ZoneInfo, start: datetime, end: datetime, send_time: str | None = None) -> bool:
    a, b = start.astimezone(tz), end.astimezone(tz)
    if period == "hourly":
        return end - start == timedelta(hours=1) and a.minute == a.second == 0
    if not send_time or send_time == "00:00":
        return (a.time().isoformat() == b.time().isoformat() == "00:00:00"
                and (b.date() - a.date()).days == 1)
    return _is_day_start(start, tz, send_time) and _is_day_start(end, tz, send_time) and (b.date() - a.date()).days == 1


def _is_day_start(instant: datetime, tz: ZoneInfo, send_time: str) -> bool:
    """§10.1: the first instant of its local day whose wall clock shows ``send_time`` or later."""
    local, before = instant.astimezone(tz), (instant - timedelta(seconds=1)).astimezone(tz)
    return f"{local:%H:%M}" >= send_time and (before.date() < local.date() or f"{before:%H:%M}" < send_time)


def _check_digests(r, users, events, deliveries, digests, items, hourly_plans, default_tz, default_period):
    digest_of: dict[int, int] = {}
    per_digest: Counter = Counter()
    for item in items:
        if item.delivery_id in digest_of:
            r.bad("delivery_in_two_digests", f"delivery {item.delivery_id}")
        digest_of[item.delivery_id] = item.digest_id
        per_digest[item.digest_id] += 1
        g, d = digests[item.digest_id], deliveries[item.delivery_id]
        e = events[d.alert_event_id]
        if (d.user_id, d.channel) != (g.user_id, g.channel) or d.delivery_kind != "digest":
            r.bad("item_wrong_digest", f"delivery {d.id} ({d.user_id}, {d.channel}, {d.delivery_kind}) "
                                       f"in digest {g.id} of ({g.user_id}, {g.channel})")
        if not g.window_start <= e.created_at < g.window_end:
            r.bad("item_outside_window", f"event {e.id} at {e.created_at:%Y-%m-%d %H:%M:%S} in digest {g.id} "
                                         f"[{g.window_start:%Y-%m-%d %H:%M}, {g.window_end:%Y-%m-%d %H:%M})")
    keys = Counter(g.digest_key for g in digests.values())
    for key, n in keys.items():
        if n > 1:
            r.bad("digest_key_repeated", key)
    for g in digests.values():
        u = users[g.user_id]
        period = "hourly" if u.digest_period == "hourly" and u.plan in hourly_plans else default_period
        tz = ZoneInfo(u.timezone or default_tz)
        if g.period != period or not _window_ok(period, tz, g.window_start, g.window_end, u.digest_send_time):
            r.bad("digest_window", f"digest {g.id} {g.period} [{g.window_start}, {g.window_end}) for a "
                                   f"{period} user in {tz.key}")
        if g.status in ("queued", "sending"):
            r.lost += per_digest[g.id]
            r.bad(f"digest_{g.status}", f"digest {g.id} still {g.status} ({per_digest[g.id]} items, "
                                        f"attempts {g.attempts}, due {g.next_retry_at}, {g.last_error})")
        elif g.status in ("failed", "skipped") and not g.last_error:
            r.bad("digest_no_reason", f"digest {g.id} is {g.status} without a reason")
        elif g.status == "skipped" and per_digest[g.id] and g.last_error == "digest has no items":
            r.bad("digest_skipped_with_items", f"digest {g.id}")
        r.counts[f"digests_{g.status}"] += 1
    return digest_of


def _check_deliveries(r: Report, deliveries, digests, digest_of) -> None:
    for d in deliveries.values():
        in_digest = digest_of.get(d.id)
        if d.status in ("queued", "sending"):
            r.lost += 1
            r.bad(f"delivery_{d.status}", f"delivery {d.id} ({d.delivery_kind}, {d.channel}) still {d.status} "
                                          f"(attempts {d.attempts}, due {d.next_retry_at}, {d.last_error})")
        elif d.delivery_kind == "instant":
            if in_digest is not None:
                r.bad("instant_in_digest", f"delivery {d.id} in digest {in_digest}")
            elif d.status in ("failed", "skipped") and not d.last_error:
                r.bad("delivery_no_reason", f"delivery {d.id} is {d.status} without a reason")
            r.counts[f"instant_{d.status}"] += 1
        elif in_digest is not None:
            if (d.status, d.last_error) != ("skipped", "batched_into_digest"):
                r.bad("digest_item_status", f"delivery {d.id} in digest {in_digest} is {d.status} {d.last_error}")
            r.counts[f"in_digest_{digests[in_digest].status}"] += 1
        elif d.status == "skipped" and d.last_error and d.last_error != "batched_into_digest":
            r.counts["digest_kind_skipped"] += 1
        else:
            r.lost += 1
            r.bad("digest_delivery_unaccounted", f"delivery {d.id} is {d.status} {d.last_error} in no digest")


def _check_unsubscribes(r: Report, users, unsubscribed: dict, arrivals: list[Arrival]) -> None:
    """Nothing reaches a destination after its unsubscribe's 200 (docs/web-and-security.md)."""
    address = {(u.id, "email"): (u.email or "").strip().lower() for u in users.values()}
    address.update({(u.id, "telegram"): (u.telegram_chat_id or "").strip() for u in users.values()})
    after: dict[tuple[str, str], float] = {(channel, address[(user, channel)]): at
                                           for (user, channel), at in unsubscribed.items()}
    for a in arrivals:
        answered = after.get((a.channel, a.recipient))
        if answered is not None and a.at > answered:
            r.bad("sent_after_unsubscribe", f"{a.channel} to {a.recipient} {a.at - answered:.3f}s after the 200")
    r.counts["unsubscribes"] = len(unsubscribed)


def _describe(copies: list[Arrival], faults, rows) -> str:
    """When each copy arrived, the faults around it, and the row's end state."""
    parts = []
    for c in sorted(copies, key=lambda c: c.at):
        near = [f"{kind}{at - c.at:+.1f}s" for at, kind in faults if -10 <= at - c.at <= 35]
        parts.append(f"copy at {time.strftime('%H:%M:%S', time.localtime(c.at))}.{int(c.at % 1 * 1000):03d} "
                     f"row {c.row} faults near: {', '.join(near) or 'none'}")
    row = copies[0].row
    if row is not None:
        found = rows[row[0]].get(row[1])
        if found is not None:
            parts.append(f"row now {found.status} attempts={found.attempts} last_error={found.last_error!r}")
    return "; ".join(parts)


def _check_messages(r: Report, users, events, deliveries, digests, digest_of, arrivals, faults) -> None:
    email_user = {(u.email or "").strip().lower(): u.id for u in users.values() if u.email}
    chat_user = {(u.telegram_chat_id or "").strip(): u.id for u in users.values() if u.telegram_chat_id}
    delivery_of = {(d.user_id, d.alert_event_id, d.channel): d for d in deliveries.values()}
    digest_by_key = {g.digest_key: g for g in digests.values()}
    kills = [at for at, kind in faults if kind in KILL_FAULTS]
    per_row: dict[tuple[str, int], list[Arrival]] = defaultdict(list)
    per_event: dict[tuple[str, int, int], list[Arrival]] = defaultdict(list)

    for a in arrivals:
        r.counts[f"messages_{a.channel}"] += 1
        user = (email_user if a.channel == "email" else chat_user).get(a.recipient)
        if user is None:
            r.bad("message_unknown_recipient", f"{a.channel} message to {a.recipient}")
            continue
        rows = set()
        for event_id in a.events:
            d = delivery_of.get((user, event_id, a.channel))
            if d is None:
                r.bad("message_without_delivery", f"{a.channel} to user {user} shows event {event_id}")
                continue
            rows.add(("digest", digest_of[d.id]) if d.id in digest_of else ("delivery", d.id))
            per_event[(a.channel, user, event_id)].append(a)
        if a.channel == "email":
            rows |= _email_row(r, a, digest_by_key)
        if len(rows) != 1:
            r.bad("message_rows", f"{a.channel} message to user {user} maps to {sorted(rows) or 'no row'}")
            continue
        a.row = rows.pop()
        if a.row[0] == "digest":
            expected = sorted(deliveries[i].alert_event_id for i, g in digest_of.items() if g == a.row[1])
            shown_ok = set(a.events) <= set(expected) and len(set(a.events)) == len(a.events)
            # Items, not events (§10.3): the events of one collapse_key are one item, shown whole.
            items = defaultdict(set)
            for event_id in expected:
                items[_item_of(events[event_id])].add(event_id)
            shown_items = {_item_of(events[i]) for i in a.events if i in events}
            whole = all(items[item] <= set(a.events) for item in shown_items)
            if not shown_ok or not whole or len(shown_items) + a.more != len(items):
                r.bad("digest_body_mismatch", f"digest {a.row[1]} message shows {sorted(a.events)} "
                                              f"(+{a.more} more), items are {dict(items)}")
        per_row[a.row].append(a)

    for (channel, user, event_id), copies in per_event.items():
        if len(copies) > 1:
            if _crash_window(copies, kills):
                r.crash_window += 1
                first = min(c.at for c in copies)
                r.excused.append(f"event {event_id} to user {user} on {channel} x{len(copies)}, kill "
                                 f"{min((k - first for k in kills if k >= first - 1), default=0):+.2f}s after the "
                                 f"first copy ({copies[0].row})")
            else:
                r.duplicates += 1
                r.bad("duplicate", f"event {event_id} reached user {user} {len(copies)} times on {channel}: "
                                   + _describe(copies, faults, {"digest": digests, "delivery": deliveries}))

    for (kind, row_id), copies in per_row.items():
        row = digests[row_id] if kind == "digest" else deliveries[row_id]
        if row.status != "sent" and not _killed_after([c.at for c in copies], kills):
            r.bad("message_for_unsent_row", f"{kind} {row_id} is {row.status} ({row.last_error}) but "
                                            f"{len(copies)} message(s) arrived")
    for g in digests.values():
        if g.status == "sent" and ("digest", g.id) not in per_row:
            r.lost += 1
            r.bad("sent_digest_never_arrived", f"digest {g.id} ({g.channel}) is sent, nothing arrived")
    for d in deliveries.values():
        if d.delivery_kind == "instant" and d.status == "sent" and d.channel in ("email", "telegram") \
                and ("delivery", d.id) not in per_row:
            r.lost += 1
            r.bad("sent_delivery_never_arrived", f"delivery {d.id} ({d.channel}) is sent, nothing arrived")


def _item_of(event) -> tuple:
    return ("key", event.collapse_key) if event.collapse_key is not None else ("event", event.id)


def _check_policy(r: Report, users, events, deliveries, default_tz: str, quiet_bypass_severity: int) -> None:
    """§10.3 supersedes and §10.4 quiet hours, worked out independently from the rows.

    - an instant delivery skipped as ``superseded by #X``: X is a newer event (created_at,
      then id) of the same collapse_key with an instant delivery to the same user and
      channel — so the superseded one is accounted for, not lost;
    - an instant delivery created inside its user's quiet period, below the bypass
      severity, was not sent before the period ended."""
    from alerts.policy.quiet_hours import release_at

    by_user_event = {(d.user_id, d.alert_event_id, d.channel): d for d in deliveries.values()}
    for d in deliveries.values():
        if d.delivery_kind != "instant":
            continue
        e = events[d.alert_event_id]
        if d.status == "skipped" and (d.last_error or "").startswith(m.SUPERSEDED_BY):
            newer = events.get(int(d.last_error[len(m.SUPERSEDED_BY):]))
            by = by_user_event.get((d.user_id, newer.id, d.channel)) if newer is not None else None
            if (newer is None or e.collapse_key is None or newer.collapse_key != e.collapse_key
                    or (newer.created_at, newer.id) <= (e.created_at, e.id) or by is None
                    or by.delivery_kind != "instant"):
                r.bad("supersede_invalid", f"delivery {d.id} (event {e.id}, key {e.collapse_key}) {d.last_error}")
            r.counts["instant_superseded"] += 1
        u = users[d.user_id]
        if d.status == "sent" and u.quiet_hours and e.severity < quiet_bypass_severity:
            release = release_at(d.created_at, u.quiet_hours, ZoneInfo(u.timezone or default_tz))
            if release is not None:
                r.counts["instant_held_by_quiet_hours"] += 1
                if d.sent_at < release:
                    r.bad("quiet_hours_broken", f"delivery {d.id} created {d.created_at} inside {u.quiet_hours} "
                                                f"({u.timezone or default_tz}) sent {d.sent_at}, before {release}")


def _email_row(r: Report, a: Arrival, digest_by_key) -> set:
    match = INSTANT_ID.match(a.message_id or "")
    if match:
        return {("delivery", int(match.group(1)))}
    g = digest_by_key.get(a.digest_key or "")
    # The installation's identifier follows the digest's own part: "<digest-HASH.INSTALLATION@domain>".
    if g is None or not (a.message_id or "").startswith(digest_message_id(g.digest_key).split("@")[0] + "."):
        r.bad("email_unmapped", f"Message-ID {a.message_id} X-Alerts-Digest-Key {a.digest_key}")
        return set()
    return {("digest", g.id)}


def _crash_window(copies: list[Arrival], kills: list[float]) -> bool:
    """Every copy but the last was followed by a worker kill within the crash window."""
    return _killed_after(sorted(c.at for c in copies)[:-1], kills)


def _killed_after(arrivals: list[float], kills: list[float]) -> bool:
    """A worker was killed within the crash window after each of these arrivals."""
    return bool(arrivals) and all(any(CRASH_WINDOW[0] <= k - t <= CRASH_WINDOW[1] for k in kills)
                                  for t in arrivals)
