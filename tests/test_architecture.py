"""The layering of ARCHITECTURE.md, checked on the source: arrows point down.

Every ``import`` of every module under ``src/retrolm`` counts, function-local ones included
(only ``if TYPE_CHECKING:`` blocks are skipped: they never run). The rules:

* no import cycle between modules;
* ``retrolm.nn`` (shared blocks) imports no model family and nothing of the pipeline;
* ``retrolm.models`` imports nothing of the pipeline (trainer, sampler driver, evaluation,
  checkpoints, CLI, seed API);
* ``retrolm.retrieval`` imports no model and nothing of the pipeline;
* only ``retrolm.cli`` calls ``print``: library code logs;
* rooms a reader can take in: no source file over 600 lines, no function body (its
  docstring aside) over 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# the pipeline: what drives models (and may import them), never imported by them
PIPELINE = (
    "retrolm.train",
    "retrolm.generation",
    "retrolm.evaluate",
    "retrolm.checkpoint",
    "retrolm.data",
    "retrolm.demo",
    "retrolm.seed_api",
    "retrolm.export",
    "retrolm.serve",
    "retrolm.cli",
)
CLI = ("retrolm.cli",)


def _within(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((src / "retrolm").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The retrolm modules ``name`` imports: ``from a.b import c`` counts as ``a.b.c`` when
    that is a module, else as ``a.b``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = _modules(src)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state and (cycle := dfs(w)):
                return cycle
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (cycle := dfs(v)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow that points up, as 'a -> b (rule)'."""
    rules = [
        ("retrolm.nn", ("retrolm.models", *PIPELINE), "blocks know no family or pipeline"),
        ("retrolm.models", PIPELINE, "models know no pipeline"),
        ("retrolm.retrieval", ("retrolm.models", *PIPELINE), "retrieval knows no model"),
    ]
    bad = []
    for src, targets in sorted(graph.items()):
        for layer, forbidden, why in rules:
            if _within(src, layer) and not _within(src, CLI):
                bad += [f"{src} -> {t} ({why})" for t in sorted(targets) if _within(t, forbidden)]
    return bad


def print_calls(src: Path = SRC) -> list[str]:
    """'module:line' of every ``print(...)`` outside the CLI."""
    out = []
    for name, path in _modules(src).items():
        if _within(name, CLI):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
            ):
                out.append(f"{name}:{node.lineno}")
    return out


MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 80


def oversized(root: Path = SRC) -> list[str]:
    """Source files over MAX_FILE_LINES and functions whose body (docstring aside) runs over
    MAX_FUNCTION_LINES, as ``path:line name (n lines)``."""
    out = []
    for path in sorted((root / "retrolm").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(root)
        if len(text.splitlines()) > MAX_FILE_LINES:
            out.append(f"{rel} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if ast.get_docstring(node) is not None and len(body) > 1:
                body = body[1:]
            size = node.end_lineno - body[0].lineno + 1
            if size > MAX_FUNCTION_LINES:
                out.append(f"{rel}:{node.lineno} {node.name} ({size} lines)")
    return out


def test_files_and_functions_stay_readable():
    assert oversized() == []


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "retrolm.models.registry" in graph and "retrolm.nn.attention" in graph
    # function-local and TYPE_CHECKING-free imports are found
    assert "retrolm.models.retro.fused" in graph["retrolm.models.retro.model"]
    assert "retrolm.nn.attention" in graph["retrolm.models.retro.model"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_arrows_point_down():
    assert layer_violations(import_graph()) == []


def test_only_the_cli_prints():
    assert print_calls() == []


@pytest.mark.parametrize(
    "module, line, expect",
    [
        ("retrolm/nn/attention.py", "from retrolm.models.registry import FAMILIES\n", "arrow"),
        ("retrolm/models/routing/model.py", "from retrolm.generation import generate\n", "arrow"),
        ("retrolm/models/registry.py", "def _f():\n    import retrolm.checkpoint\n", "arrow"),
        ("retrolm/retrieval/index.py", "from retrolm.models.retro import RETRO\n", "arrow"),
        ("retrolm/utils.py", "from retrolm.models.registry import FAMILIES\n", "cycle"),
        ("retrolm/sampling.py", "def _f():\n    print('hi')\n", "print"),
        ("retrolm/utils.py", "def _f():\n" + "    x = 1\n" * 81, "size"),
        ("retrolm/utils.py", "x = 1\n" * 600, "size"),
    ],
)
def test_a_planted_violation_is_caught(tmp_path, module, line, expect):
    """Each check fails on a copy of the source with one bad line appended (so it can fail)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(
        SRC / "retrolm", src / "retrolm", ignore=shutil.ignore_patterns("*.pyc", "csrc")
    )
    path = src / module
    path.write_text(path.read_text() + "\n\n" + line)
    graph = import_graph(src)
    assert find_cycle(import_graph()) is None  # (the real source stays clean)
    found = {
        "arrow": bool(layer_violations(graph)),
        "cycle": find_cycle(graph) is not None,
        "print": bool(print_calls(src)),
        "size": bool(oversized(src)),
    }
    assert found[expect], (module, line)
