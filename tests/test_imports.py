"""The house rules: modules stay small (400 lines, functions 80) and imports point one way. No import cycle among
the project's modules (module-level and lazy imports inside functions alike), nothing imports ``pipeline.cli`` (the
command table sits on top),
``transforms`` imports neither ``networks`` nor ``pipeline``, ``networks`` does not import ``pipeline``, and a stage of
``pipeline`` imports only its own modules and the stages before it in ``STAGES``."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "transforms", "networks")
# the data flow, in order: a stage may import the ones before it, never one after it
STAGES = ("common", "data", "evaluate", "train", "infer", "report", "serve")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from pkg import mod`` counts as ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_command_line():
    graph = import_graph()
    importers = sorted(m for m, targets in graph.items() if "pipeline.cli" in targets and m != "pipeline.__main__")
    assert importers == []


def test_transforms_import_neither_networks_nor_pipeline():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if t.split(".")[0] in ("networks", "pipeline"))
           for m, targets in graph.items() if m.startswith("transforms")}
    assert {m: t for m, t in bad.items() if t} == {}


def test_networks_do_not_import_pipeline():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if t.startswith("pipeline"))
           for m, targets in graph.items() if m.startswith("networks")}
    assert {m: t for m, t in bad.items() if t} == {}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 2 and parts[1] in STAGES else None


def test_stages_import_only_earlier_stages():
    graph = import_graph()
    bad = []
    for module, targets in graph.items():
        stage = _stage(module)
        if stage is None:
            continue
        for target in targets:
            other = _stage(target)
            if other is not None and STAGES.index(other) > STAGES.index(stage):
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_every_pipeline_module_lives_in_a_stage():
    loose = sorted(m for m in import_graph() if m.startswith("pipeline.") and _stage(m) is None
                   and m not in ("pipeline.cli", "pipeline.__main__") and m.split(".")[1] not in STAGES)
    assert loose == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def test_modules_and_functions_stay_small():
    """The house rule: one concern per module (at most 400 lines), functions of at most 80 lines."""
    too_long = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            name = path.relative_to(REPO).as_posix()
            if len(text.splitlines()) > MAX_MODULE_LINES:
                too_long.append(f"{name}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        too_long.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == []
