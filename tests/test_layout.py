"""The package's layout rules, checked on the source with `ast`: imports point one way between rooms (lower rooms never
import higher ones), no import cycles between modules, files stay short, only the CLI parses command lines or prints."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "phi3v"
# rooms from low to high; a module may import its own room and the rooms before it, never one after it
ORDER = [
    {"errors"},
    {"hardware", "examples"},
    {"models"},
    {"processing"},
    {"quant"},
    {"checkpoint"},
    {"inference"},
    {"data"},
    {"api"},
    {"train"},
    {"eval"},
    {"recipes"},
    {"serve"},
    {"cli", "__init__"},
    {"__main__"},  # `python -m` entry points
]
RANK = {room: i for i, rooms in enumerate(ORDER) for room in rooms}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """phi3v module name -> file, for every .py file of the package."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = modules()


def room(module: str) -> str:
    """The room of a module: its subpackage (or top-level module); `python -m` entry points (__main__) are the CLI's."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def imported(module: str, path: Path) -> set[str]:
    """phi3v modules that `module` imports anywhere in its file (function-level imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "phi3v" or n.startswith("phi3v.")}
    return {n for n in out if n in MODULES and n != module}


GRAPH = {m: imported(m, p) for m, p in MODULES.items()}


def test_every_room_has_a_rank():
    assert {room(m) for m in MODULES} <= set(RANK), {room(m) for m in MODULES} - set(RANK)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    mine = room(module)
    upward = sorted(t for t in GRAPH[module] if room(t) != mine and RANK[room(t)] >= RANK[mine])
    assert not upward, f"{module} ({mine}) imports {upward}: a room may only import the rooms below it ({ORDER})"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_are_short_and_only_the_cli_parses_or_prints(module):
    path = MODULES[module]
    lines = path.read_text().count("\n")
    assert lines <= MAX_LINES, f"{path} has {lines} lines (keep files under ~{MAX_LINES})"
    if room(module) in ("cli", "__main__"):
        return
    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert "argparse" not in names, f"{path} imports argparse: command-line parsing belongs in phi3v/cli"
    prints = [n.lineno for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert not prints, f"{path} prints (lines {prints}): library modules return values; the CLI prints"


def test_the_checker_sees_the_known_edges():
    """The checker itself: relative imports resolve, function-level imports count, `from pkg import sub` is sub."""
    assert "phi3v.models.phi3_v" in GRAPH["phi3v.models"]
    assert "phi3v.inference.engine" in GRAPH["phi3v.inference.generate"]
    assert "phi3v.api" in GRAPH["phi3v.cli.common"]  # imported inside load_model()
    assert "phi3v.quant.layers" in GRAPH["phi3v.checkpoint.load"]
