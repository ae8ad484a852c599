"""What every command shares: exit codes, one-line fatal errors, settings, the engine,
logging and ``--now``."""
from __future__ import annotations

import logging
import sys
import traceback
from contextlib import contextmanager

import click
import sqlalchemy as sa

from alerts.core.clock import Clock, parse_instant
from alerts.core.settings import ConfigError, Settings, mask_url_password
from alerts.core.db import NotMigrated, check_migrated, connection_problem, make_engine

EXIT_USAGE = 2
EXIT_UNEXPECTED = 3
EXIT_UNREACHABLE = 3  # docs/operations.md: the database cannot be reached
# What a driver raises when it cannot connect (refused, timed out, no such database,
# SQLite's "unable to open database file") or loses the connection.
CONNECTION_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError)


class Fatal(click.ClickException):
    """A one-line error with its exit code (2 = usage/config, 3 = unexpected)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def clock_option(help_text: str):
    return click.option("--now", "now_text", metavar="ISO-8601", help=help_text)


def make_clock(now_text: str | None) -> Clock:
    """The command's clock: from ``--now`` when given, else the wall clock."""
    if not now_text:
        return Clock()
    try:
        return Clock(parse_instant(now_text))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--now") from None


def instant(now_text: str | None):
    """One instant for a command that needs no running clock (status, retry)."""
    return make_clock(now_text).start


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise Fatal(f"configuration error: {exc}") from None


def verbose_requested() -> bool:
    """Whether ``-v`` was given, to the group (``alerts -v …``) or to the command."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.params.get("verbose"):
            return True
        ctx = ctx.parent
    return False


@contextmanager
def reaching_database(settings: Settings):
    """Turn a database that cannot be reached into one line naming DATABASE_URL (its
    password masked) and the driver's cause, exit 3; ``-v`` adds the traceback."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        if verbose_requested():
            traceback.print_exc(file=sys.stderr)
        raise Fatal(f"DATABASE_URL {mask_url_password(settings.database_url)}: cannot reach the database: "
                    f"{connection_problem(exc)}", EXIT_UNREACHABLE) from None


def open_engine(settings: Settings):
    """An engine on a database that is at the current schema, else exit 2 (not
    migrated) or 3 (cannot be reached)."""
    engine = make_engine(settings.database_url, prepared_statements=settings.db_prepared_statements)
    try:
        with reaching_database(settings):
            check_migrated(engine)
    except NotMigrated as exc:
        engine.dispose()
        raise Fatal(str(exc)) from None
    except BaseException:
        engine.dispose()
        raise
    return engine


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
