"""The runner and the `alerts` command as a user runs them: real processes, exit codes."""
import json
import os
import subprocess
import sys

import pytest

from alerts.core.db import migrate


def run(args, env_extra=None, cwd=None, stdin=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALERTS_", "DATABASE_URL"))}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_an_unmigrated_database_exits_2_and_says_to_migrate(tmp_path):
    result = run(["-m", "alerts.runner", "--phase", "all"], {"DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})
    assert result.returncode == 2
    assert "alerts migrate" in result.stderr


@pytest.mark.parametrize("variable,value", [
    ("ALERTS_DIGEST_PERIOD", "weekly"), ("ALERTS_TIMEZONE", "Nowhere/City"), ("ALERTS_MAX_ATTEMPTS", "lots"),
    ("ALERTS_SMTP_TLS", "sometimes"), ("ALERTS_EMAIL_BACKEND", "fax"),
])
def test_an_invalid_setting_exits_2_naming_the_variable_and_changes_nothing(tmp_path, variable, value):
    url = f"sqlite:///{tmp_path}/x.db"
    migrate(url)
    before = (tmp_path / "x.db").read_bytes()
    result = run(["-m", "alerts.runner", "--phase", "all"], {"DATABASE_URL": url, variable: value})
    assert result.returncode == 2
    assert variable in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "x.db").read_bytes() == before


@pytest.mark.parametrize("args,needle", [
    (["--phase", "x"], "--phase"),
    (["--now", "yesterday"], "--now"),
    (["--now", "2026-05-13T00:01:00"], "--now"),
])
def test_bad_usage_exits_2_naming_the_option(tmp_path, args, needle):
    url = f"sqlite:///{tmp_path}/x.db"
    migrate(url)
    result = run(["-m", "alerts.runner", *args], {"DATABASE_URL": url})
    assert result.returncode == 2
    assert needle in result.stderr


def test_an_empty_database_is_a_clean_no_op(sqlite_url):
    result = run(["-m", "alerts.runner", "--phase", "all", "--json"], {"DATABASE_URL": sqlite_url})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out == {
        "a": {"accepted": 0, "rejected": 0},
        "b": {"events_fanned_out": 0, "deliveries_created": 0},
        "d": {"digests_created": 0, "digest_items_attached": 0, "deliveries_marked_batched": 0},
        "c": {"instant": {"sent": 0, "retried": 0, "failed": 0, "skipped": 0},
              "digests": {"sent": 0, "retried": 0, "failed": 0, "skipped": 0}},
    }


def test_migrate_is_idempotent_from_the_command_line(tmp_path):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    first, second = run(["-m", "alerts", "migrate"], env), run(["-m", "alerts", "migrate"], env)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout


def test_the_demo_runs_on_a_fresh_directory_and_writes_email_to_the_outbox(tmp_path):
    result = run(["-m", "alerts", "demo"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    emails = list((tmp_path / "outbox").glob("*.eml"))
    assert emails, result.stdout
    assert any("X-Alerts-Digest-Key" in p.read_text() for p in emails), "the demo ends with a digest"
    assert str(tmp_path / "outbox") in result.stdout
    again = run(["-m", "alerts", "demo"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
