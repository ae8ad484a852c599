"""``alerts destinations``: the destinations a provider said are gone (docs/policy.md)."""
from __future__ import annotations

import json

import click

from alerts.sending import blocks
from alerts.core import tables as m
from alerts.cli.common import Fatal, load_settings, open_engine
from alerts.operations.status import printable


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the blocks as JSON.")
@click.option("--enable", nargs=2, metavar="USER CHANNEL", default=None,
              help="Remove the block of user id USER on CHANNEL (email, telegram, sms).")
def destinations(as_json: bool, enable: tuple[str, str] | None) -> None:
    """List blocked destinations, or lift one with --enable USER CHANNEL.

    A block holds while the user's address for the channel is the one that failed
    ("in force"); a changed address is tried again without lifting anything.
    """
    user_id, channel = _parse_enable(enable) if enable else (None, None)
    settings = load_settings()
    engine = open_engine(settings)
    try:
        with engine.begin() as conn:
            if user_id is not None:
                if not blocks.lift(conn, user_id, channel):
                    raise Fatal(f"--enable: user {user_id} has no block on {channel}")
                click.echo(f"lifted the block of user {user_id} on {channel}")
                return
            listed = blocks.listed(conn)
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(listed, default=str, indent=2))
        return
    if not listed:
        click.echo("no blocked destinations")
    for row in listed:
        state = "in force" if row["in_force"] else "address changed since"
        click.echo(f"user {row['user_id']} {row['channel']} {printable(row['address'])}"
                   f" since {row['since']:%Y-%m-%d %H:%M} UTC ({state}): {printable(row['reason'])}")


def _parse_enable(enable: tuple[str, str]) -> tuple[int, str]:
    user, channel = enable
    try:
        user_id = int(user)
    except ValueError:
        raise click.BadParameter(f"USER must be a user id, got {user!r}", param_hint="--enable") from None
    if channel not in m.CHANNELS:
        raise click.BadParameter(f"CHANNEL must be one of {', '.join(m.CHANNELS)}, got {channel!r}",
                                 param_hint="--enable")
    return user_id, channel
