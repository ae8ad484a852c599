"""The promises the repository makes about itself: README commands and CI agree."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands():
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "alerts demo" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()


def test_every_environment_variable_the_code_reads_is_documented():
    sources = [*ROOT.glob("alerts/**/*.py"), ROOT / "celery_app.py", ROOT / "beat_schedule.py"]
    names = set()
    for path in sources:
        names |= set(re.findall(r"[\"']((?:ALERTS|CELERY|DATABASE)_[A-Z0-9_]+)[\"']", path.read_text()))
    documented = (ROOT / "replit.md").read_text()
    assert names, "the pattern finds the variables"
    assert sorted(n for n in names if f"`{n}`" not in documented) == []
