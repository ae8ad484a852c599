"""The promises the repository makes about itself: README commands and CI agree, and the
documentation (README.md, replit.md, docs/) names every setting and only what exists."""
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


CONFIGURATION = ROOT / "docs" / "configuration.md"
# What a newcomer reads: the README, the operator guide and everything under docs/.
DOCS = [ROOT / "README.md", ROOT / "replit.md", *sorted((ROOT / "docs").glob("*.md"))]


def _variables_the_code_reads() -> set[str]:
    sources = [*ROOT.glob("alerts/**/*.py"), ROOT / "celery_app.py", ROOT / "beat_schedule.py"]
    names = set()
    for path in sources:
        names |= set(re.findall(r"[\"']((?:ALERTS|CELERY|DATABASE)_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def test_every_environment_variable_the_code_reads_is_documented():
    names = _variables_the_code_reads()
    documented = CONFIGURATION.read_text()
    assert names, "the pattern finds the variables"
    assert sorted(n for n in names if f"`{n}`" not in documented) == []


def test_the_configuration_tables_name_exactly_the_variables_the_code_reads():
    """One table row per variable (its name alone in the first cell), none missing, none
    made up, none twice."""
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", CONFIGURATION.read_text(), re.M)
    assert sorted(n for n in set(rows) if rows.count(n) > 1) == []
    assert sorted(set(rows) ^ _variables_the_code_reads()) == []


def test_docs_name_nothing_outside_the_repository():
    for path in DOCS:
        text = path.read_text()
        assert "shared/" not in text, path.name
        assert "SPEC §" not in text, path.name


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _outside_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def test_docs_links_resolve():
    """Every relative link in the docs names a file that exists, and an anchor a heading of it."""
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code_blocks(path.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor:
                headings = re.findall(r"^#+ (.+)$", _outside_code_blocks(linked.read_text()), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{path.name}: {target}")
    assert broken == []
