"""``alerts bounce``: one bounce or abuse report from an MTA's pipe (alerts/subscribers/bounces.py,
docs/bounces.md).

Exit codes are the MTA's: 0 whenever the report was read, whatever it was (a report we
ignore is never bounced back), 75 (EX_TEMPFAIL: the MTA keeps the message and tries
again) when the database cannot be reached, 2 for a configuration error.
"""
from __future__ import annotations

import sys

import click

from alerts.cli.common import EXIT_UNREACHABLE, Fatal, load_settings, make_clock, open_engine, reaching_database
from alerts.subscribers import bounces

EX_TEMPFAIL = 75
# A report is a few kilobytes; one that carries a large original is read this far (its
# report parts come first), so a huge message cannot exhaust memory.
MAX_REPORT_BYTES = 10 * 1024 * 1024


@click.command()
@click.option("--recipient", metavar="ADDRESS",
              help="The address the MTA delivered the report to (Postfix pipe: ${recipient}); looked at first.")
def bounce(recipient: str | None) -> None:
    """Read one delivery status notification or abuse report from stdin and act on it.

    A permanent failure (5.x.x) blocks the user's email; an abuse report unsubscribes
    it; anything else changes nothing. Prints one line saying what was done.
    """
    settings = load_settings()
    if not settings.bounce_address:
        raise Fatal("configuration error: ALERTS_BOUNCE_ADDRESS: must be set for alerts bounce (the address "
                    "local@domain whose local+TOKEN@domain every email is sent from)")
    raw = sys.stdin.buffer.read(MAX_REPORT_BYTES)
    decision = bounces.decide(bounces.read_report(raw), settings, recipient)
    if isinstance(decision, str):
        click.echo(decision)
        return
    now = make_clock(None).start
    try:
        engine = open_engine(settings)
        try:
            with reaching_database(settings):  # lost mid-way: the same one line
                click.echo(bounces.apply(engine, decision, now))
        finally:
            engine.dispose()
    except Fatal as exc:
        if exc.exit_code == EXIT_UNREACHABLE:
            exc.exit_code = EX_TEMPFAIL
        raise
