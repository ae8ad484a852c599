"""Helpers shared by the benchmarks: result files, a throwaway PostgreSQL database, an
aiosmtpd server in a process of its own, the bare smtplib reference loop and CPU
accounting from /proc.

The SMTP server runs in its own process so its CPU never competes for a sender's GIL;
both the reference loop and the code under test talk to the same server.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shlex
import smtplib
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("ALERTS_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

RESULTS = ROOT / "bench" / "results"
# What a production installation sets (replit.md's quick start): every email then carries
# the unsubscribe and preferences links and the one-click headers, signed per user.
PRODUCTION_LINKS = {"ALERTS_PUBLIC_URL": "https://alerts.example.com",
                    "ALERTS_SECRET_KEY": "bench-secret-key-of-at-least-32-characters"}

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


# --- result files ----------------------------------------------------------------------------

def write_results(name: str, payload: dict, *, python_speed_us: int | list[int] | None = None) -> Path:
    """Write ``payload`` to bench/results/<name>-<YYYY-MM-DD>.json (the UTC date; -2, -3, …
    when that file exists) with what is needed to read it later: the command line, the
    git commit and whether the working tree differed from it, the machine (cores and, when
    the benchmark read it, ``python_speed_us``: one reading, or one per run) and when it
    was written. Returns the path."""
    now = datetime.now(timezone.utc)
    record = {
        "benchmark": name,
        "command": _command_line(),
        "written_at": now.isoformat(timespec="seconds"),
        "git": _git_state(),
        "machine": {"nproc": os.cpu_count(), "python_speed_us": python_speed_us,
                    "python": sys.version.split()[0]},
        "results": payload,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem, n = f"{name}-{now:%Y-%m-%d}", 1
    while True:
        path = RESULTS / f"{stem}{'' if n == 1 else f'-{n}'}.json"
        try:
            with open(path, "x") as f:  # exclusive: two runs at once never share a file
                json.dump(record, f, indent=2, default=str)
                f.write("\n")
        except FileExistsError:
            n += 1
            continue
        print(f"[bench] results written to {path.relative_to(ROOT)}", file=sys.stderr)
        return path


def _command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python3", str(shown), *sys.argv[1:]])


def _git_state() -> dict:
    """HEAD, and the tracked files that differ from it (another engineer's edit in the
    tree is part of what was measured)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    modified = sorted(line[3:] for line in (status or "").splitlines())
    return {"commit": commit.strip() if commit else None,
            "dirty": bool(modified) if status is not None else None, "modified": modified}


# --- the SMTP server, in its own process -----------------------------------------------------

def _serve_smtp(pipe, data_delay: float) -> None:
    from tests.support.fakes.smtp_server import FakeSmtpServer

    with FakeSmtpServer() as server:
        server.data_delay = data_delay
        pipe.send(server.port)
        while True:
            command = pipe.recv()
            if command == "count":
                pipe.send(len(server._received))
            elif command == "ids":
                pipe.send([m.group(1).decode() for mail in server.messages
                           if (m := _MESSAGE_ID.search(mail.data))])
            elif command == "sizes":
                pipe.send([len(mail.data) for mail in server.messages])
            elif command == "reset":
                server.reset()
                server.data_delay = data_delay
                pipe.send(True)
            elif command == "stop":
                return


class SmtpServerProcess:
    """tests/fakes/smtp_server.FakeSmtpServer in a child process, asked over a pipe.
    ``data_delay``: seconds it waits before answering DATA (a real provider's latency)."""

    def __init__(self, data_delay: float = 0.0):
        self._pipe, child = multiprocessing.Pipe()
        self._process = multiprocessing.Process(target=_serve_smtp, args=(child, data_delay), daemon=True)
        self._process.start()
        self.pid = self._process.pid
        self.port = self._pipe.recv()

    def ask(self, command: str):
        self._pipe.send(command)
        return self._pipe.recv()

    def stop(self) -> None:
        self._pipe.send("stop")
        self._process.join(5)


def _serve_provider_api(pipe, delay: float) -> None:
    from tests.support.fakes import provider_api

    # The fake's handler writes the headers and the body of an answer in two writes; with
    # Nagle's algorithm the second waits for the client's delayed ACK (40 ms on Linux),
    # a latency no real provider adds. Only this process's copy of the class is changed.
    provider_api._Handler.disable_nagle_algorithm = True
    with provider_api.ProviderApi() as api:
        def scripted() -> None:
            if delay:
                api.delay(delay, service="telegram")  # every request, until reset

        scripted()
        pipe.send((api.telegram_api_base, api.bot_token))
        while True:
            command = pipe.recv()
            if command == "count":
                pipe.send(len(api.telegram_messages))
            elif command == "chats":
                pipe.send([message.chat_id for message in api.telegram_messages])
            elif command == "arrivals":
                pipe.send([at for _, at in api.telegram_requests])
            elif command == "reset":
                api.reset()
                scripted()
                pipe.send(True)
            elif command == "stop":
                return


class ProviderApiProcess:
    """tests/support/fakes/provider_api.ProviderApi (the Telegram Bot API fake) in a child
    process, asked over a pipe, so its CPU never counts as the sender's. ``delay``: seconds
    it waits before answering each sendMessage."""

    def __init__(self, delay: float = 0.0):
        self._pipe, child = multiprocessing.Pipe()
        self._process = multiprocessing.Process(target=_serve_provider_api, args=(child, delay), daemon=True)
        self._process.start()
        self.pid = self._process.pid
        self.telegram_api_base, self.bot_token = self._pipe.recv()

    def ask(self, command: str):
        self._pipe.send(command)
        return self._pipe.recv()

    def stop(self) -> None:
        self._pipe.send("stop")
        self._process.join(5)


# --- a throwaway database ---------------------------------------------------------------------

def create_database(prefix: str, admin_url: str = ADMIN_URL) -> str:
    import sqlalchemy as sa

    from alerts.core.db import make_engine, migrate

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    return url


def drop_database(url: str, admin_url: str = ADMIN_URL) -> None:
    import sqlalchemy as sa

    from alerts.core.db import make_engine

    name = sa.engine.make_url(url).database
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


@contextmanager
def database(url: str | None = None, prefix: str = "alerts_bench") -> Iterator[str]:
    """``url`` migrated (its alert tables are the caller's to empty), or a throwaway
    database created for the block and dropped after it."""
    from alerts.core.db import migrate

    if url:
        migrate(url)
        yield url
        return
    url = create_database(prefix)
    try:
        yield url
    finally:
        drop_database(url)


def sample_message(url: str, port: int, outbox, **extra: str) -> tuple[str, str, bytes]:
    """The first row of ``outbox`` (alerts.sending.outbox.INSTANT or DIGESTS) rendered and built
    exactly as the senders do it (``extra``: their settings beyond SMTP): (from, to, bytes)
    for the bare smtplib reference."""
    from alerts.channels.email import build_mime
    from alerts.channels.registry import build_channels
    from alerts.core.db import make_engine

    settings = smtp_settings(url, port, **extra)
    engine = make_engine(url)
    with engine.connect() as conn:
        first = conn.exec_driver_sql(f"SELECT min(id) FROM {outbox.table.name}").scalar_one()
        (job,) = outbox.load(conn, [(first, 1)], settings, build_channels(settings))
    engine.dispose()
    return settings.email_from, job.recipient, bytes(build_mime(job.message, settings.email_from, job.recipient))


def digest_sample_message(url: str, port: int, **extra: str) -> tuple[str, str, bytes]:
    """``sample_message`` for the first digest."""
    from alerts.sending.outbox import DIGESTS

    return sample_message(url, port, DIGESTS, **extra)


def count_sent(url: str, table: str) -> int:
    """Rows of ``table`` (one of ours) in status ``sent``."""
    from alerts.core.db import make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        count = conn.exec_driver_sql(f"SELECT count(*) FROM {table} WHERE status = 'sent'").scalar_one()
    engine.dispose()
    return count


def smtp_settings(url: str, port: int, **extra: str):
    from alerts.core.settings import Settings

    return Settings.from_env({"DATABASE_URL": url, "ALERTS_SMTP_HOST": "127.0.0.1", "ALERTS_SMTP_PORT": str(port),
                              "ALERTS_SMTP_TLS": "none", **extra})


# --- the reference ------------------------------------------------------------------------------

def bare_smtplib(port: int, sender: str, recipient: str, data: bytes, n: int) -> float:
    """Seconds for one reused smtplib connection to send ``data`` n times."""
    started = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        for _ in range(n):
            smtp.sendmail(sender, [recipient], data)
    return time.perf_counter() - started


def bare_smtplib_pool(port: int, sender: str, recipient: str, data: bytes, n: int, connections: int) -> float:
    """Seconds for ``connections`` smtplib connections, each in a thread of its own, to
    send ``data`` n times between them: the reference for senders that overlap waits."""
    import threading

    left = [n]
    lock = threading.Lock()

    def work(smtp: smtplib.SMTP) -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            smtp.sendmail(sender, [recipient], data)

    pool = [smtplib.SMTP("127.0.0.1", port) for _ in range(connections)]
    threads = [threading.Thread(target=work, args=(smtp,)) for smtp in pool]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for smtp in pool:
        smtp.quit()
    return seconds


# --- CPU accounting ------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from "state" on (field 3)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            stats[int(entry)] = fields
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    total, pending, root = 0.0, [pid], True
    while pending:
        current = pending.pop()
        fields = stats.get(current)
        if fields is None:
            continue
        # utime, stime (fields 14, 15) and, for the root, cutime, cstime (16, 17)
        ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if root else 0)
        total += ticks / _TICK
        root = False
        pending += children.get(current, [])
    return total


def postmaster_pid(url: str) -> int | None:
    """The pid of the PostgreSQL server that serves ``url``, when it runs on this machine:
    the parent of the backend a connection gets. (Other clusters may run here too — a
    test's own server — so the first postmaster in /proc is not necessarily ours.)"""
    import psycopg

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    fields = _stat(backend)
    return int(fields[1]) if fields is not None else None


def postgres_cpu(postmaster: int | None) -> float:
    """CPU seconds of a PostgreSQL server so far: the postmaster's own, every backend it
    has reaped (its cutime + cstime: the time of the connections that have closed) and
    every live process under it (backends, checkpointer, autovacuum…). NaN when the
    server does not run on this machine."""
    if postmaster is None or _stat(postmaster) is None:
        return float("nan")
    return process_tree_cpu(postmaster)


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL as libpq reads it (no ``+driver``)."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def redis_cpu(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


_PROBE_SETUP = """
from email import policy
from email.message import EmailMessage

def build():
    m = EmailMessage(policy=policy.SMTP)
    m["From"], m["To"], m["Subject"] = "Alerts <alerts@example.com>", "user@example.com", "Daily digest: 3 alerts"
    m.set_content("Flow cut at Emden after a compressor trip\\n" * 20, charset="utf-8", cte="quoted-printable")
    m.add_alternative("<p>Flow cut at Emden after a compressor trip</p>\\n" * 20, subtype="html",
                      charset="utf-8", cte="quoted-printable")
    return m.as_bytes()
"""


def python_speed_us() -> int:
    """Microseconds this machine takes, right now, to build and flatten one two-part
    message with the standard library's ``email`` package (best of five): the kind of
    Python work a send is made of. A ratio to a latency-bound reference falls as this
    rises, and on a shared machine it can double from one hour to the next, so compare
    runs only at about the same reading (a tiny loop such as ``sum(range(50))`` swings
    as much within a minute and says less)."""
    import timeit

    return round(min(timeit.repeat("build()", setup=_PROBE_SETUP, number=100, repeat=5)) * 1e6 / 100)


def machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot, all cores, from
    /proc/stat. Busy over a run's length is how many cores it kept busy: at the machine's
    core count the run was CPU-bound, whatever the code did with its waits."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def wait_for(predicate, timeout: float, poll: float = 0.05) -> float:
    """perf_counter() at the moment ``predicate()`` first held."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise RuntimeError("timed out")
        time.sleep(poll)
    return time.perf_counter()


def busy_cores(seconds: float = 2.0) -> float:
    """Cores the machine keeps busy over ``seconds`` with nothing of ours running: read
    before a measurement, it says whether something else (a test suite) shared the machine."""
    before, started = machine_cpu()[0], time.perf_counter()
    time.sleep(seconds)
    return round((machine_cpu()[0] - before) / (time.perf_counter() - started), 2)


def producer_client(broker_url: str):
    """A Celery client that publishes like a producer: JSON, to the queues the app routes to."""
    from celery import Celery

    client = Celery("bench-client", broker=broker_url)
    client.conf.update(task_serializer="json", accept_content=["json"], task_default_queue="alerts",
                       task_routes={"alerts.send_*": {"queue": "alerts.send"}})
    return client


def worker_env(database_url: str, broker_url: str, smtp_port: int, **extra: str) -> dict:
    """The environment of a bench worker: this one's, minus every setting of ours, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALERTS_", "CELERY_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, CELERY_BROKER_URL=broker_url, ALERTS_SMTP_HOST="127.0.0.1",
               ALERTS_SMTP_PORT=str(smtp_port), ALERTS_SMTP_TLS="none", PYTHONPATH=str(ROOT), **extra)
    return env

