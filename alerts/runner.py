"""Cron-safe one-shot runner: ``python -m alerts.runner --phase all`` (SPEC §7).

Exit codes: 0 success (also when a phase was locked or sends failed — those are recorded
in the rows), 2 bad usage / bad configuration / unmigrated database, 3 unexpected error.
"""
from __future__ import annotations

import html
import json
import logging
import re
import sys
from datetime import datetime, timezone

import click

from alerts.config import ConfigError, Settings
from alerts.db import NotMigrated, check_migrated, make_engine
from alerts.pipeline import expand, run_phases, session

EXIT_USAGE = 2
EXIT_UNEXPECTED = 3

log = logging.getLogger("alerts.runner")


class Fatal(click.ClickException):
    """A one-line error with its exit code (2 = usage/config, 3 = unexpected)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def parse_now(value: str | None) -> datetime:
    if not value:
        return datetime.now(timezone.utc)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO-8601 timestamp: {value!r}", param_hint="--now") from None
    if parsed.tzinfo is None:
        raise click.BadParameter("needs a UTC offset, e.g. 2026-05-13T00:01:00+00:00", param_hint="--now")
    return parsed.astimezone(timezone.utc)


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise Fatal(f"configuration error: {exc}") from None


def open_engine(settings: Settings):
    """An engine on a database that is at the current schema, else exit 2."""
    engine = make_engine(settings.database_url)
    try:
        check_migrated(engine)
    except NotMigrated as exc:
        engine.dispose()
        raise Fatal(str(exc)) from None
    return engine


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def execute(phase: str, now_text: str | None, dry_run: bool, as_json: bool) -> dict:
    settings = load_settings()
    now = parse_now(now_text)
    engine = open_engine(settings)
    try:
        with session(engine, settings, dry_run=dry_run) as (db, channels):
            results = run_phases(db, expand(phase), now, settings, channels)
            recorded = channels.recorded() if dry_run else []
    except click.ClickException:
        raise
    except Exception as exc:  # noqa: BLE001 — the last line of defence: exit 3, keep the trace in the log
        log.exception("run failed")
        raise Fatal(f"unexpected error: {type(exc).__name__}: {exc}", EXIT_UNEXPECTED) from None
    finally:
        engine.dispose()
    if dry_run:
        results["would_send"] = [describe(item) for item in recorded]
    emit(results, as_json, dry_run)
    return results


def describe(item) -> dict:
    """One would-send line: the email subject, else the message's first line as text."""
    channel, recipient, message = item
    summary = getattr(message, "subject", None)
    if summary is None:
        first = message.text.splitlines()[0] if message.text else ""
        summary = html.unescape(re.sub(r"<[^>]+>", "", first)) if channel == "telegram" else first
    return {"channel": channel, "recipient": recipient, "summary": summary[:120]}


def emit(results: dict, as_json: bool, dry_run: bool) -> None:
    if as_json:
        click.echo(json.dumps(results, default=str))
        return
    prefix = "[dry run] " if dry_run else ""
    for name, counts in results.items():
        if name == "would_send":
            continue
        click.echo(f"{prefix}phase {name}: {_flat(counts)}")
    for item in results.get("would_send", []):
        click.echo(f"{prefix}would send {item['channel']} to {item['recipient']}: {item['summary']}")


def _flat(counts: dict) -> str:
    if counts.get("locked"):
        return "locked (another run holds this phase)"
    return ", ".join(
        f"{key}: {_flat(value) if isinstance(value, dict) else value}" for key, value in counts.items()
    )


PHASE_CHOICE = click.Choice(["a", "b", "c", "d", "all"], case_sensitive=False)


def run_options(func):
    func = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(func)
    func = click.option("--now", "now_text", metavar="ISO-8601",
                        help="Run as if at this instant (with offset), e.g. 2026-05-13T00:01:00+00:00.")(func)
    func = click.option("--dry-run", is_flag=True, help="Do everything in a transaction that is rolled back; send nothing.")(func)
    func = click.option("--phase", type=PHASE_CHOICE, default="all", show_default=True,
                        help="a intake, b fan-out, d digest build, c send, all = A→B→D→C.")(func)
    func = click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")(func)
    return func


@click.command("run")
@run_options
def main(phase: str, now_text: str | None, dry_run: bool, as_json: bool, verbose: bool) -> None:
    """Run pipeline phases once (cron-safe)."""
    setup_logging(verbose)
    execute(phase.lower(), now_text, dry_run, as_json)


if __name__ == "__main__":
    main(prog_name="python -m alerts.runner")
