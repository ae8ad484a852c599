"""The package's shape (docs/architecture.md): every import between alerts' modules,
function-level ones included, goes from a higher layer to a lower one or within a
folder, and no modules import each other in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import alerts

PACKAGE = Path(alerts.__file__).resolve().parent

# Lower layers never import higher ones; folders on one layer do not import each other.
LAYERS = {
    "core": 0,
    "policy": 1,
    "messages": 2,
    "channels": 3,
    "sending": 4,
    "phases": 5, "subscribers": 5,
    "operations": 6, "celery": 6,
    "web": 7,  # pages over subscribers/, /metrics over operations/
    "cli": 8,
    "": 9,  # entry points at the top: runner, __main__
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """alerts.* modules imported anywhere in the file (a ``from X import y`` counts
    ``X.y`` when that is a module of ours, else ``X``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("alerts"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alerts") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) & MODULES.keys() for name, path in MODULES.items()}


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def test_every_folder_has_a_layer_and_a_docstring():
    for path in PACKAGE.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            assert path.name in LAYERS, f"alerts/{path.name}/ has no layer in this test"
            tree = ast.parse((path / "__init__.py").read_text())
            assert ast.get_docstring(tree), f"alerts/{path.name}/__init__.py says nothing of what lives there"


def test_no_module_imports_a_higher_layer_or_a_sibling_folder():
    wrong = []
    for module, imported in GRAPH.items():
        for other in imported:
            a, b = folder(module), folder(other)
            if a != b and LAYERS[b] >= LAYERS[a] and "alerts" not in (module, other):  # the root: __version__
                wrong.append(f"{module} ({a or 'top'}) imports {other} ({b or 'top'})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_nothing_under_tests_imports_the_benchmarks():
    tests = PACKAGE.parent / "tests"
    offenders = [str(path.relative_to(tests)) for path in tests.rglob("*.py")
                 if any(isinstance(node, (ast.Import, ast.ImportFrom))
                        and any(name == "bench" or name.startswith("bench.")
                                for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                             else [node.module or ""]))
                        for node in ast.walk(ast.parse(path.read_text())))]
    assert not offenders, offenders
