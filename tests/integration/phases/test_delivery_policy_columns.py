"""Bad delivery-policy input (docs/policy.md, issue 11 point 5): the database refuses a malformed
send time or quiet period (CHECK constraints of migration 0004, PostgreSQL and SQLite),
and a malformed §10 setting exits 2 naming its variable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from alerts.core import tables as m
from alerts.core.settings import ConfigError, Settings
from alerts.core.db import migrate
from tests.support.factories import add_user

BAD_SEND_TIMES = ["7:30", "07:3", "24:00", "07:60", "0730", "07-30", "07:30 ", " 07:30", "7h30", "", "ab:cd",
                  "07:30:00", "٠٧:٣٠"]  # the last: Arabic-Indic digits, which \d would take
GOOD_SEND_TIMES = ["00:00", "07:30", "23:59", "19:05", None]
BAD_QUIET_HOURS = ["22:00-22:00",  # equal start and end is malformed (§10.4)
                   "22:00–07:00", "22:00 - 07:00", "22:00-7:00", "22-07", "24:00-07:00", "22:00-07:60",
                   "22:00/07:00", "22:00-07:00-", "22:0007:00", "", "22:00"]
GOOD_QUIET_HOURS = ["22:00-07:00", "00:00-06:30", "13:00-14:00", "23:59-00:00", None]


def _insert(engine, **cols) -> None:
    with engine.begin() as conn:
        add_user(conn, **cols)


@pytest.mark.parametrize("value", BAD_SEND_TIMES)
def test_the_database_refuses_a_malformed_send_time(engine, value):
    with pytest.raises(sa.exc.IntegrityError, match="digest_send_time"):
        _insert(engine, digest_send_time=value)


@pytest.mark.parametrize("value", BAD_QUIET_HOURS)
def test_the_database_refuses_malformed_quiet_hours(engine, value):
    with pytest.raises(sa.exc.IntegrityError, match="quiet_hours"):
        _insert(engine, quiet_hours=value)


def test_the_database_keeps_well_formed_values(engine):
    for send_time, quiet in zip(GOOD_SEND_TIMES, GOOD_QUIET_HOURS):
        _insert(engine, digest_send_time=send_time, quiet_hours=quiet)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(m.users.c.digest_send_time, m.users.c.quiet_hours)
                              .order_by(m.users.c.id)).all()
    assert [tuple(r) for r in stored] == list(zip(GOOD_SEND_TIMES, GOOD_QUIET_HOURS))


def test_an_update_to_a_malformed_send_time_is_refused_too(engine):
    _insert(engine, digest_send_time="07:30")
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            conn.execute(sa.update(m.users).values(digest_send_time="7:30"))
    with engine.connect() as conn:
        assert conn.execute(sa.select(m.users.c.digest_send_time)).scalar_one() == "07:30"


# --- settings -----------------------------------------------------------------------------

BAD_SETTINGS = [
    ("ALERTS_DIGEST_SEND_TIME", "7:30"), ("ALERTS_DIGEST_SEND_TIME", "24:00"), ("ALERTS_DIGEST_SEND_TIME", "noon"),
    ("ALERTS_DIGEST_BYPASS_SEVERITY", "6"), ("ALERTS_DIGEST_BYPASS_SEVERITY", "high"),
    ("ALERTS_QUIET_HOURS_BYPASS_SEVERITY", "0"),
]


@pytest.mark.parametrize("variable, value", BAD_SETTINGS)
def test_a_malformed_policy_setting_names_its_variable(variable, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert info.value.variable == variable and str(info.value).startswith(variable)


def test_the_send_time_setting_defaults_to_midnight_and_reads_hh_mm():
    assert Settings.from_env({}).digest_send_time == "00:00"
    assert Settings.from_env({"ALERTS_DIGEST_SEND_TIME": "07:30"}).digest_send_time == "07:30"


@pytest.mark.parametrize("variable, value", BAD_SETTINGS[::2] + [BAD_SETTINGS[-1]])
def test_the_runner_exits_2_naming_a_malformed_policy_setting_and_changes_nothing(tmp_path, variable, value):
    url = f"sqlite:///{tmp_path}/x.db"
    migrate(url)
    before = (tmp_path / "x.db").read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALERTS_", "DATABASE_URL"))}
    result = subprocess.run([sys.executable, "-m", "alerts.runner", "--phase", "all"],
                            env={**env, "DATABASE_URL": url, variable: value},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert variable in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "x.db").read_bytes() == before
