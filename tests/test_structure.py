"""The package's shape, as its contributors rely on it: the folders follow the flow of a study and every import
points one way along it, with no cycle (imports inside functions included); modules stay small enough to read
in one sitting; every command module keeps the command contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sinklens.cli import build_parser, command_modules

PACKAGE = Path(__file__).resolve().parents[1] / "sinklens"
# The flow of a study, from what everything uses to what nothing else uses: a module may import its own
# layer and the layers before it, never a later one.
LAYERS = [
    {"sinklens.errors", "sinklens._io", "sinklens.defaults", "sinklens.results"},
    {"sinklens.load"},
    {"sinklens.settings"},
    {"sinklens.run"},
    {"sinklens.analyses"},
    {"sinklens.studies"},
    {"sinklens.present"},
    {"sinklens.commands", "sinklens.cli", "sinklens.__main__"},
]
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, anywhere in its body."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c not in (name, "sinklens")}
        graph[name] = found
    return graph


def _layer(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    return None


def test_every_module_has_a_layer_and_imports_point_one_way():
    graph = _imports()
    unplaced = sorted(m for m in graph if m != "sinklens" and _layer(m) is None)
    assert not unplaced, f"modules outside the flow (add them to a layer): {unplaced}"
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m != "sinklens"
        for d in deps
        if _layer(d) > _layer(m)
    )
    assert not upward, f"imports that point against the flow: {upward}"


def test_no_import_cycle():
    graph = _imports()
    graph.pop("sinklens")  # the package's lazy __init__ names every module without importing any
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(dep) :] + [dep])}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_modules_fit_in_one_sitting():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
    assert len((PACKAGE / "cli.py").read_text(encoding="utf-8").splitlines()) < 200


def test_every_command_module_keeps_the_contract():
    commands = command_modules()
    assert {
        "report",
        "table",
        "neurons",
        "sink-layer",
        "circuit",
        "patch",
        "evaluate",
        "scan",
        "attack",
        "sinks",
    } <= set(commands)
    for name, module in commands.items():
        assert module.__doc__ and isinstance(module.HELP, str), name
        assert callable(module.add_arguments) and callable(module.run), name
        assert "Example: sinklens " + name in module.__doc__, (
            f"{name}: its docstring gives no example"
        )
    parser = build_parser()
    for name in commands:
        args = parser.parse_args([name, *(["--patch", "p.json"] if name == "evaluate" else [])])
        assert args.run is commands[name].run
