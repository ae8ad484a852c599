"""``alerts explain``: why a user did or did not get an event, channel by channel
(alerts/operations/explain.py; docs/support.md)."""
from __future__ import annotations

import json

import click

from alerts.cli.common import Fatal, clock_option, instant, load_settings, open_engine, reaching_database


@click.command()
@click.option("--user", "user_id", type=int, required=True, metavar="ID", help="The user's id.")
@click.option("--event", "event_id", type=int, required=True, metavar="ID", help="The event's id.")
@click.option("--json", "as_json", is_flag=True, help="Print the same as one JSON object.")
@clock_option("Judge due times and leases as if at this instant.")
def explain(user_id: int, event_id: int, as_json: bool, now_text: str | None) -> None:
    """Why user ID did or did not get event ID: the event's status, each subscription and
    whether it matched, the delivery on every channel and what became of it, the digest
    it joined. Changes nothing."""
    from alerts.operations.explain import Unknown, explain as explain_event, render

    settings = load_settings()
    now = instant(now_text)
    engine = open_engine(settings)
    try:
        with reaching_database(settings), engine.connect() as conn:
            report = explain_event(conn, user_id, event_id, settings, now)
    except Unknown as exc:
        raise Fatal(str(exc)) from None
    finally:
        engine.dispose()
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
