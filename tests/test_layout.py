"""The package's shape: no import cycle among bts's modules, counting imports inside functions
(which only hide a cycle), and the stitched model small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the bts modules it imports anywhere in its body (module or function level)."""
    modules = {_module(p): p for p in (SRC / "bts").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from bts.x import y` names module bts.x.y when that is a module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_counting_function_level_imports():
    graph = import_graph()
    assert "bts.stitch" in graph and graph["bts.stitch"]  # the walk did find imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_stitched_model_fits_on_a_few_screens():
    """StitchedModel under 250 lines; what its forward walks for the maths under 80."""
    tree = ast.parse((SRC / "bts" / "stitch.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    model = classes["StitchedModel"]
    assert model.end_lineno - model.lineno + 1 < 250
    methods = {n.name: n for n in model.body if isinstance(n, ast.FunctionDef)}
    layer = {n.name: n for n in classes["StitchLayer"].body if isinstance(n, ast.FunctionDef)}
    path = [methods["forward"], methods["_run_looped"], methods["apply_stitch"]]
    path += [layer["forward"], layer["_experts_into_hub"], layer["_hub_into_experts"]]
    lines = sum(f.end_lineno - f.lineno + 1 - _docstring_lines(f) for f in path)
    assert lines <= 80, lines


def _docstring_lines(function: ast.FunctionDef) -> int:
    first = function.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        return first.end_lineno - first.lineno + 1
    return 0


def test_test_modules_share_through_helpers_not_each_other():
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.rglob("test_*.py")}
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in names:
                raise AssertionError(f"{path.name} imports {node.module}: move it to helpers.py")
            if isinstance(node, ast.Import) and names & {a.name for a in node.names}:
                raise AssertionError(f"{path.name} imports a test module: use helpers.py")
