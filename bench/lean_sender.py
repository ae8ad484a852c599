"""The lean reference for digest sends: what a careful engineer would write by hand to
send the due digests, without Celery and importing nothing of the product.

    python bench/lean_sender.py DATABASE_URL --smtp-port PORT [--processes 2] [--threads 8]

``--processes`` P processes × ``--threads`` T threads. Each thread keeps one autocommit
psycopg connection and one smtplib connection, and loops until no digest is due:

1. claim one due digest: one ``UPDATE … WHERE id = (SELECT … ORDER BY next_retry_at
   LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING`` (queued → sending, the attempt counted).
   Ordered by the due time, the pick walks the partial index of queued digests
   (``ix_digests_due``) and costs what a claim by id costs; ``ORDER BY id`` would walk
   the primary key past every digest already sent, its PostgreSQL CPU growing with the
   position (0.25 → 0.6 ms a claim over 3,000 digests);
2. load its items and the user's address: one ``SELECT`` (items → deliveries → events,
   users);
3. render a text and an HTML part with Jinja2 (templates of its own, about the size of
   the product's digest email);
4. build the MIME message with the standard library's ``email`` package
   (multipart/alternative, Date, Message-ID, List-Unsubscribe);
5. send it with smtplib;
6. record ``sent`` with one ``UPDATE``, fenced on the claim.

Three statements — three round trips — per digest, each committed on its own.
psycopg prepares a statement on the server after its fifth run, as it does for the
product. bench_latency.py runs it next to the Celery workers on the same digests
(``LeanSenders``); run alone it prints digests/s and the processes' CPU.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import smtplib
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from zoneinfo import ZoneInfo

import jinja2
import psycopg

SENDER = "EnergyRiskIQ Alerts <alerts@alerts.example.com>"
ENVELOPE_SENDER = "alerts@alerts.example.com"
PUBLIC_URL = "https://alerts.example.com"
DEFAULT_TIMEZONE = "Europe/Amsterdam"
SECRET = b"lean-sender-secret-key-of-32-bytes!"
RETRY_AFTER = "1 minute"
SEVERITY_LABELS = {1: "info", 2: "low", 3: "medium", 4: "high", 5: "critical"}
SEVERITY_COLORS = {1: "#4a7c59", 2: "#8a8a2e", 3: "#c07a12", 4: "#c0392b", 5: "#7b1020"}

CLAIM = """
    UPDATE user_alert_digests SET status = 'sending', attempts = attempts + 1, claimed_at = now()
     WHERE id = (SELECT id FROM user_alert_digests
                  WHERE status = 'queued' AND next_retry_at <= now()
                  ORDER BY next_retry_at LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING id, user_id, digest_key, period, window_start, window_end, attempts"""
LOAD = """
    SELECT u.email, coalesce(u.timezone, %(timezone)s) AS timezone,
           e.id, e.alert_type, e.region, e.severity, e.title, e.summary, e.url, e.created_at
      FROM user_alert_digest_items i
      JOIN user_alert_deliveries d ON d.id = i.delivery_id
      JOIN alert_events e ON e.id = d.alert_event_id
      JOIN users u ON u.id = d.user_id
     WHERE i.digest_id = %(digest)s
     ORDER BY e.severity DESC, e.created_at DESC, e.id"""
SENT = """
    UPDATE user_alert_digests SET status = 'sent', sent_at = now(), claimed_at = NULL, last_error = NULL
     WHERE id = %s AND status = 'sending' AND attempts = %s"""
UNSENT = """
    UPDATE user_alert_digests SET status = %s, last_error = %s, claimed_at = NULL,
           next_retry_at = CASE WHEN %s = 'queued' THEN now() + interval '""" + RETRY_AFTER + """' END
     WHERE id = %s AND status = 'sending' AND attempts = %s"""

TEXT = """\
{{ heading }}
{{ window }}
{{ count }}

{% for e in items %}
[{{ e.label | upper }}] {{ e.title }}
{% if e.summary %}
{{ e.summary }}
{% endif %}
#{{ e.id }} · {{ e.alert_type }}{% if e.region %} · {{ e.region }}{% endif %} · {{ e.time }}
{% if e.url %}
{{ e.url }}
{% endif %}

{% endfor %}
--
EnergyRiskIQ Alerts · you receive this digest because of your alert preferences.
Manage alerts: {{ manage_url }}
Unsubscribe: {{ unsubscribe_url }}
"""
HTML = """\
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{{ heading }}</title></head>
<body style="margin:0;padding:16px;font-family:Arial,Helvetica,sans-serif;font-size:14px;color:#1a1a1a;">
<h1 style="font-size:18px;margin:0 0 4px 0;">{{ heading }}</h1>
<p style="margin:0 0 16px 0;color:#555555;">{{ window }} · {{ count }}</p>
{% for e in items %}
<div style="margin:0 0 16px 0;padding:10px 12px;border-left:4px solid {{ e.color }};background:#f7f7f7;">
  <div><span style="display:inline-block;padding:1px 6px;border-radius:3px;color:#ffffff;background:{{ e.color }};font-size:12px;font-weight:bold;">{{ e.label | upper }}</span>
  <strong>{{ e.title }}</strong></div>
{% if e.summary %}
  <div style="margin-top:4px;">{{ e.summary }}</div>
{% endif %}
  <div style="margin-top:4px;color:#666666;font-size:12px;">#{{ e.id }} · {{ e.alert_type }}{% if e.region %} · {{ e.region }}{% endif %} · {{ e.time }}{% if e.url %} · <a href="{{ e.url }}">{{ e.url }}</a>{% endif %}</div>
</div>
{% endfor %}
<p style="color:#888888;font-size:12px;">EnergyRiskIQ Alerts · you receive this digest because of your alert preferences. <a href="{{ manage_url }}" style="color:#888888;">Manage alerts</a> · <a href="{{ unsubscribe_url }}" style="color:#888888;">Unsubscribe</a></p>
</body>
</html>
"""

_ENV = jinja2.Environment(loader=jinja2.DictLoader({"digest.txt": TEXT, "digest.html": HTML}),
                          autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
_ZONES: dict[str, ZoneInfo] = {}


def _zone(name: str) -> ZoneInfo:
    if name not in _ZONES:
        _ZONES[name] = ZoneInfo(name)
    return _ZONES[name]


def _signed(user_id: int, purpose: str) -> str:
    mac = hmac.new(SECRET, f"{purpose}:{user_id}".encode(), hashlib.sha256).digest()[:16]
    return f"{user_id}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def render(digest: tuple, rows: list[tuple]) -> tuple[str, str, dict]:
    """(text, html, headers) of one digest; ``digest`` is the claim's row, ``rows`` the load's."""
    digest_id, user_id, digest_key, period, window_start, window_end, _attempts = digest
    email, tz = rows[0][0], _zone(rows[0][1])
    start, end = window_start.astimezone(tz), window_end.astimezone(tz)
    items = [{"id": r[2], "alert_type": r[3], "region": r[4], "label": SEVERITY_LABELS.get(r[5], "alert"),
              "color": SEVERITY_COLORS.get(r[5], "#555555"), "title": r[6], "summary": r[7], "url": r[8],
              "time": r[9].astimezone(tz).strftime("%H:%M")} for r in rows]
    unsubscribe_url = f"{PUBLIC_URL}/unsubscribe/{_signed(user_id, 'unsubscribe')}"
    context = {"heading": f"Your {period} energy risk digest",
               "window": f"{start:%A %d %B %Y, %H:%M}–{end:%H:%M} {tz.key}",
               "count": f"{len(items)} alert{'s' if len(items) != 1 else ''}", "items": items,
               "manage_url": f"{PUBLIC_URL}/preferences/{_signed(user_id, 'preferences')}",
               "unsubscribe_url": unsubscribe_url}
    text = _ENV.get_template("digest.txt").render(context)
    html = _ENV.get_template("digest.html").render(context)
    digest_hash = hashlib.sha256(digest_key.encode()).hexdigest()[:32]
    headers = {"To": email, "Subject": f"{len(items)} energy risk alerts, {start:%d %B %Y}",
               "Message-ID": f"<digest-{digest_hash}@alerts.example.com>",
               "List-Unsubscribe": f"<{unsubscribe_url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    return text, html, headers


def build_mime(text: str, html: str, headers: dict) -> bytes:
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = SENDER
    message["Date"] = format_datetime(datetime.now(timezone.utc))
    for name, value in headers.items():
        message[name] = value
    message.set_content(text, charset="utf-8", cte="quoted-printable")
    message.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
    return message.as_bytes()


class Counts:
    def __init__(self):
        self.sent = self.skipped = self.failed = self.retried = 0
        self.lock = threading.Lock()

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


def send_until_done(url: str, smtp_host: str, smtp_port: int, counts: Counts, ready: threading.Barrier,
                    go: threading.Event) -> None:
    """One thread: connect, wait for ``go``, then claim → load → render → send → record
    until nothing is due."""
    smtp = smtplib.SMTP(smtp_host, smtp_port)
    try:
        with psycopg.connect(url, autocommit=True) as db:
            ready.wait()
            go.wait()
            while (digest := db.execute(CLAIM).fetchone()) is not None:
                smtp = send_one(db, smtp, digest, counts, smtp_host, smtp_port)
    finally:
        smtp.close()


def send_one(db: psycopg.Connection, smtp: smtplib.SMTP, digest: tuple, counts: Counts, smtp_host: str,
             smtp_port: int) -> smtplib.SMTP:
    """Load, render, send and record one claimed digest; the SMTP connection to use next."""
    digest_id, attempts = digest[0], digest[6]
    rows = db.execute(LOAD, {"digest": digest_id, "timezone": DEFAULT_TIMEZONE}).fetchall()
    if not rows:
        db.execute(UNSENT, ("skipped", "digest without items", "skipped", digest_id, attempts))
        counts.add("skipped")
        return smtp
    text, html, headers = render(digest, rows)
    try:
        smtp.sendmail(ENVELOPE_SENDER, [headers["To"]], build_mime(text, html, headers))
    except smtplib.SMTPResponseException as exc:
        status = "failed" if 500 <= exc.smtp_code < 600 else "queued"
        db.execute(UNSENT, (status, f"smtp {exc.smtp_code}", status, digest_id, attempts))
        counts.add("failed" if status == "failed" else "retried")
        return smtp
    except (smtplib.SMTPException, OSError) as exc:  # the connection: this digest waits, the next gets a new one
        db.execute(UNSENT, ("queued", f"smtp {type(exc).__name__}", "queued", digest_id, attempts))
        counts.add("retried")
        smtp.close()
        return smtplib.SMTP(smtp_host, smtp_port)
    db.execute(SENT, (digest_id, attempts))
    counts.add("sent")
    return smtp


def serve(url: str, smtp_host: str, smtp_port: int, threads: int) -> None:
    """One sender process for LeanSenders: connect every thread, print "ready", wait for a
    line on stdin, send until nothing is due, print one JSON line (counts, CPU seconds and
    wall seconds since the go)."""
    counts, go = Counts(), threading.Event()
    ready = threading.Barrier(threads + 1)
    workers = [threading.Thread(target=send_until_done, args=(url, smtp_host, smtp_port, counts, ready, go))
               for _ in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait(timeout=60)
    print("ready", flush=True)
    sys.stdin.readline()
    cpu, started = time.process_time(), time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
    print(json.dumps({"sent": counts.sent, "skipped": counts.skipped, "failed": counts.failed,
                      "retried": counts.retried, "cpu_s": time.process_time() - cpu,
                      "seconds": time.perf_counter() - started}), flush=True)


class LeanSenders:
    """``processes`` lean sender processes of ``threads`` threads each, connected and
    waiting; ``go()`` starts them together, ``finish()`` waits for them and sums up."""

    def __init__(self, url: str, smtp_port: int, processes: int, threads: int, smtp_host: str = "127.0.0.1"):
        command = [sys.executable, __file__, url, "--serve", "--smtp-host", smtp_host, "--smtp-port", str(smtp_port),
                   "--threads", str(threads)]
        self.processes = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                          for _ in range(processes)]
        for process in self.processes:
            if process.stdout.readline().strip() != "ready":
                self.kill()
                raise RuntimeError("a lean sender process did not start")

    def go(self) -> None:
        for process in self.processes:
            process.stdin.write("go\n")
            process.stdin.flush()

    def exited(self) -> bool:
        return all(process.poll() is not None for process in self.processes)

    def finish(self, timeout: float = 600) -> dict:
        """Counts and CPU seconds summed over the processes, once every one has finished."""
        reports = []
        for process in self.processes:
            line = process.stdout.readline()
            process.wait(timeout)
            if process.returncode != 0 or not line:
                raise RuntimeError(f"a lean sender process exited with {process.returncode}")
            reports.append(json.loads(line))
        return {key: sum(report[key] for report in reports) for key in reports[0]} | {
            "seconds": max(report["seconds"] for report in reports)}

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the PostgreSQL database whose due digests to send")
    parser.add_argument("--smtp-host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="threads per process")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # one process of LeanSenders
    options = parser.parse_args()
    url = options.url.replace("postgresql+psycopg://", "postgresql://")
    if options.serve:
        return serve(url, options.smtp_host, options.smtp_port, options.threads)
    senders = LeanSenders(url, options.smtp_port, options.processes, options.threads, options.smtp_host)
    senders.go()
    report = senders.finish()
    report["digests_per_s"] = round(report["sent"] / report["seconds"], 1) if report["seconds"] else None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
