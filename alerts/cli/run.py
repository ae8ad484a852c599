"""``alerts run`` and ``python -m alerts.runner``: run pipeline phases once (docs/architecture.md).

Exit codes: 0 success (also when a phase was locked or sends failed — those are recorded
in the rows), 2 bad usage / bad configuration / unmigrated database, 3 unexpected error.
"""
from __future__ import annotations

import html
import json
import logging
import re

import click

from alerts.cli.common import (EXIT_UNEXPECTED, Fatal, clock_option, load_settings, make_clock, open_engine,
                               setup_logging, verbose_requested)
from alerts.phases.pipeline import expand, run_phases, session

log = logging.getLogger("alerts.runner")

PHASE_CHOICE = click.Choice(["a", "b", "c", "d", "all"], case_sensitive=False)


def execute(phase: str, now_text: str | None, dry_run: bool, as_json: bool, max_seconds: int | None = None) -> dict:
    clock = make_clock(now_text)  # first: --max-seconds counts from the runner's start
    clock.limit_seconds = max_seconds
    settings = load_settings()
    engine = open_engine(settings)
    try:
        with session(engine, settings, dry_run=dry_run) as (db, channels):
            results = run_phases(db, expand(phase), clock, settings, channels)
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
    if counts.get("not_started"):
        return "not started (--max-seconds reached)"
    return ", ".join(
        f"{key}: {_flat(value) if isinstance(value, dict) else value}" for key, value in counts.items()
    )


@click.command("run")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
@click.option("--phase", type=PHASE_CHOICE, default="all", show_default=True,
              help="a intake, b fan-out, d digest build, c send, all = A→B→D→C.")
@click.option("--dry-run", is_flag=True, help="Do everything in a transaction that is rolled back; send nothing.")
@clock_option("Run as if at this instant (with offset), e.g. 2026-05-13T00:01:00+00:00.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--max-seconds", type=click.IntRange(min=1), metavar="N",
              help="After N seconds start no new send and no later phase; unsent claims go back to queued.")
def run(phase: str, now_text: str | None, dry_run: bool, as_json: bool, verbose: bool,
        max_seconds: int | None) -> None:
    """Run pipeline phases once (cron-safe)."""
    setup_logging(verbose_requested())
    execute(phase.lower(), now_text, dry_run, as_json, max_seconds)
