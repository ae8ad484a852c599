"""deploy/github-actions/alerts-cron.yml (docs/deployment.md): valid against GitHub's workflow
schema, nothing of medium or high severity from zizmor, and the settings the deployment docs ask for."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from ruamel.yaml import YAML

WORKFLOW = Path(__file__).resolve().parents[2] / "deploy" / "github-actions" / "alerts-cron.yml"
TOOL_TIMEOUT_SECONDS = 120
PINNED = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{40}$")


def tool(name: str) -> str:
    """A console script of the test extra: on PATH, else next to this Python."""
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


@pytest.fixture(scope="module")
def workflow() -> dict:
    return YAML(typ="safe").load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def job(workflow) -> dict:
    (only,) = workflow["jobs"].values()
    return only


def run_step(job) -> dict:
    (step,) = [s for s in job["steps"] if "alerts run" in s.get("run", "")]
    return step


def test_it_validates_against_githubs_workflow_schema():
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                            capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("persona", ["regular", "auditor"])
def test_zizmor_finds_nothing_of_medium_or_high_severity(persona):
    result = subprocess.run([tool("zizmor"), "--offline", "--no-exit-codes", "--format", "json", f"--persona={persona}",
                             str(WORKFLOW)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout)
    serious = [(f["ident"], f["determinations"]["severity"]) for f in findings
               if f["determinations"]["severity"] in ("Medium", "High")]
    assert serious == []


def test_an_accepted_zizmor_finding_says_why():
    for line in WORKFLOW.read_text().splitlines():
        if "zizmor: ignore[" in line:
            assert re.search(r"zizmor: ignore\[[\w-]+\]\s*\S+", line), f"no reason given: {line.strip()}"


def test_it_runs_every_5_minutes_and_on_demand_with_a_dry_run_input(workflow):
    assert workflow["on"]["schedule"] == [{"cron": "*/5 * * * *"}]
    dry_run = workflow["on"]["workflow_dispatch"]["inputs"]["dry_run"]
    assert (dry_run["type"], dry_run["default"]) == ("boolean", False)


def test_runs_never_overlap_and_a_running_one_is_never_cancelled(workflow):
    assert workflow["concurrency"]["cancel-in-progress"] is False
    assert workflow["concurrency"]["group"]


def test_it_asks_for_no_more_than_reading_the_code(workflow, job):
    assert workflow["permissions"] in ({}, {"contents": "read"})
    assert "permissions" not in job or job["permissions"] in ({}, {"contents": "read"})


def test_every_action_is_pinned_to_a_commit_with_its_version_in_a_comment(job):
    uses = [step["uses"] for step in job["steps"] if "uses" in step]
    assert uses and all(PINNED.match(ref) for ref in uses), uses
    for ref in uses:
        line = next(line for line in WORKFLOW.read_text().splitlines() if ref in line)
        assert re.search(r"#\s*v\d+(\.\d+)*", line), line
    checkout = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False


def test_secrets_reach_the_job_as_environment_variables(job):
    assert job["env"]["DATABASE_URL"] == "${{ secrets.DATABASE_URL }}"
    assert job["env"]["ALERTS_SMTP_PASSWORD"] == "${{ secrets.ALERTS_SMTP_PASSWORD }}"
    text = "\n".join(step.get("run", "") for step in job["steps"])
    assert "${{" not in text, "no expression inside a script: inputs and secrets go through env"


def test_it_migrates_then_runs_with_max_seconds_below_the_job_timeout(job):
    commands = [step.get("run", "") for step in job["steps"]]
    migrate = next(n for n, text in enumerate(commands) if "alerts migrate" in text)
    run = next(n for n, text in enumerate(commands) if "alerts run" in text)
    assert migrate < run
    limits = {int(n) for n in re.findall(r"--max-seconds (\d+)", commands[run])}
    assert len(limits) == 1
    (max_seconds,) = limits
    assert 60 <= max_seconds <= job["timeout-minutes"] * 60 - 180, "room for setup and the send in progress"
    assert "--phase all" in commands[run]
    assert "--dry-run" in commands[run] and run_step(job)["env"]["DRY_RUN"] == "${{ inputs.dry_run }}"


def test_the_max_seconds_it_passes_is_accepted_by_the_runner(job, db_url):
    """The exact command line of the workflow's run step parses (a dry run on an empty database)."""
    max_seconds = re.search(r"--max-seconds (\d+)", run_step(job)["run"]).group(1)
    result = subprocess.run([sys.executable, "-m", "alerts.runner", "--phase", "all", "--max-seconds", max_seconds,
                             "--dry-run", "--json"], env={"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin",
                                                          "PYTHONPATH": str(WORKFLOW.parents[2])},
                            capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["c"] == {"instant": {"sent": 0, "retried": 0, "failed": 0, "skipped": 0},
                                              "digests": {"sent": 0, "retried": 0, "failed": 0, "skipped": 0}}
