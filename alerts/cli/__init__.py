"""The ``alerts`` console script: migrate, run, ingest, status, check, preview, retry, demo.

Each command is a thin shell: it reads the settings, opens the engine, makes the clock
and calls the module that does the work. ``common`` holds what they share.
"""
from __future__ import annotations

import json
import sys

import click
import sqlalchemy as sa

import alerts
from alerts.operations.check import DEFAULT_MAX_AGE_SECONDS, MAX_AGE_LIMIT_SECONDS
from alerts.cli.common import (CONNECTION_ERRORS, EXIT_UNREACHABLE, Fatal, clock_option, instant, load_settings,
                               open_engine, reaching_database, setup_logging)
from alerts.cli.bounce import bounce
from alerts.cli.destinations import destinations
from alerts.cli.explain import explain
from alerts.cli.run import run
from alerts.cli.telegram import telegram
from alerts.cli.users import users
from alerts.cli.web import web
from alerts.core.db import Database, connection_problem, migrate as migrate_db


@click.group()
@click.version_option(alerts.__version__, prog_name="alerts")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def cli(verbose: bool) -> None:
    """EnergyRiskIQ Alerts: energy-risk events to instant and digest messages."""
    setup_logging(verbose)


@cli.command()
def migrate() -> None:
    """Bring the database to the current schema (safe to run repeatedly)."""
    settings = load_settings()
    with reaching_database(settings):
        revision = migrate_db(settings.database_url, prepared_statements=settings.db_prepared_statements)
    click.echo(f"database at revision {revision}")


cli.add_command(run)
cli.add_command(destinations)
cli.add_command(web)
cli.add_command(explain)
cli.add_command(bounce)
cli.add_command(users)
cli.add_command(telegram)


@cli.command()
@click.argument("source", type=click.File("rb"))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def ingest(source, as_json: bool) -> None:
    """Store events from a JSON Lines FILE ('-' = stdin), one event per line.

    A malformed line is reported with its line number and skipped; the others are
    stored. A repeated event_key is a no-op. Exits 1 when any line was malformed.
    """
    from alerts.phases.ingest import ingest_lines

    settings = load_settings()
    engine = open_engine(settings)
    try:
        report = ingest_lines(Database(engine), source)
    finally:
        engine.dispose()
    for line_number, reason in report.errors:
        click.echo(f"line {line_number}: {reason}", err=True)
    if as_json:
        click.echo(json.dumps({"stored": report.stored, "duplicates": report.duplicates,
                               "errors": [{"line": n, "reason": r} for n, r in report.errors]}))
    else:
        click.echo(f"stored {report.stored}, duplicates {report.duplicates}, malformed {len(report.errors)}")
    if report.errors:
        sys.exit(1)  # the good lines are stored; a cron job or CI step must still see the bad ones


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@clock_option("Measure ages as if at this instant.")
def status(as_json: bool, now_text: str | None) -> None:
    """Counts by table and status, age of the oldest pending row, the latest errors."""
    from alerts.operations.status import collect, render

    settings = load_settings()
    engine = open_engine(settings)
    try:
        report = collect(engine, instant(now_text))
    finally:
        engine.dispose()
    click.echo(json.dumps(report, default=str, indent=2) if as_json else render(report))


@cli.command()
@click.option("--max-age", "max_age", type=click.IntRange(min=1, max=MAX_AGE_LIMIT_SECONDS),
              default=DEFAULT_MAX_AGE_SECONDS, show_default=True, metavar="SECONDS",
              help="A queued row due for longer than this is a problem.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@clock_option("Judge as if at this instant.")
def check(max_age: int, as_json: bool, now_text: str | None) -> None:
    """For monitors: exit 0 and `ok`, or exit 1 and one line per kind of problem."""
    from alerts.operations.check import describe, find_problems

    settings = load_settings()
    engine = open_engine(settings)
    try:
        problems = find_problems(engine, instant(now_text), max_age, settings.sending_lease_seconds)
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps({"ok": not problems, "max_age_seconds": max_age,
                               "lease_seconds": settings.sending_lease_seconds, "problems": problems}))
    else:
        for line in [describe(p, max_age, settings.sending_lease_seconds) for p in problems] or ["ok"]:
            click.echo(line)
    if problems:
        sys.exit(1)


@cli.command()
@click.option("--deliveries/--no-deliveries", default=True, help="Re-queue failed instant deliveries.")
@click.option("--digests/--no-digests", default=True, help="Re-queue failed digests.")
@click.option("--id", "row_ids", type=int, multiple=True, help="Only these row ids (repeatable).")
@clock_option("Due from this instant (default: now).")
def retry(deliveries: bool, digests: bool, row_ids: tuple[int, ...], now_text: str | None) -> None:
    """Re-queue failed rows with a fresh set of attempts, due at once.

    ``last_error`` is kept: it tells what went wrong, and on a digest it marks the digest
    as no longer open, so Phase D puts newer events in a follow-up digest instead.
    The blocks of the destinations re-queued are lifted: retrying means trying them again.
    """
    from alerts.sending import blocks
    from alerts.core import tables as m

    settings = load_settings()
    now = instant(now_text)
    engine = open_engine(settings)
    tables = ([m.user_alert_deliveries] if deliveries else []) + ([m.user_alert_digests] if digests else [])
    try:
        with engine.begin() as conn:
            for table in tables:
                where = [table.c.status == m.FAILED]
                if table is m.user_alert_deliveries:
                    where.append(table.c.delivery_kind == "instant")
                if row_ids:
                    where.append(table.c.id.in_(row_ids))
                lifted = blocks.lift_for_rows(conn, table, where)
                count = conn.execute(
                    sa.update(table).where(*where)
                    .values(status=m.QUEUED, attempts=0, next_retry_at=now, claimed_at=None, enqueued_at=None)
                ).rowcount
                click.echo(f"{table.name}: re-queued {count}" + (f", lifted {lifted} block(s)" if lifted else ""))
    finally:
        engine.dispose()


@cli.command()
@click.option("--digest", "digest_id", type=int, help="A digest row id.")
@click.option("--user", "user_id", type=int, help="With --date: preview a window not built yet.")
@click.option("--date", "day", metavar="YYYY-MM-DD", help="The user's local day (daily) to preview.")
@click.option("--channel", type=click.Choice(["email", "telegram"]), default=None, help="Only this channel.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write the email as .txt/.html files here.")
def preview(digest_id, user_id, day, channel, out_dir) -> None:
    """Render a digest's email and Telegram text without sending or changing anything."""
    from alerts.operations.preview import preview_digest

    if digest_id is None and (user_id is None or day is None):
        raise click.UsageError("give --digest ID, or --user ID with --date YYYY-MM-DD")
    settings = load_settings()
    engine = open_engine(settings)
    try:
        preview_digest(engine, settings, digest_id=digest_id, user_id=user_id, day=day,
                       channel=channel, out_dir=out_dir, echo=click.echo)
    except LookupError as exc:
        raise Fatal(str(exc)) from None
    finally:
        engine.dispose()


@cli.command()
@click.option("--db", "db_path", default="alerts-demo.db", show_default=True, type=click.Path(dir_okay=False),
              help="The demo's own SQLite file.")
@click.option("--outbox", default="outbox", show_default=True, type=click.Path(file_okay=False),
              help="Where every message (email, Telegram, SMS) is written as a file.")
def demo(db_path: str, outbox: str) -> None:
    """Run the whole pipeline on sample data, sealed: its own SQLite file, every message
    to files. Reads no setting: never touches DATABASE_URL, SMTP, Telegram or Twilio."""
    from alerts.operations.demo import run_demo

    try:
        run_demo(db_path, outbox=outbox, echo=click.echo)
    except CONNECTION_ERRORS as exc:
        raise Fatal(f"--db {db_path}: cannot open the demo's database: {connection_problem(exc)}",
                    EXIT_UNREACHABLE) from None


def main() -> None:
    cli(prog_name="alerts")


if __name__ == "__main__":
    sys.exit(main())
