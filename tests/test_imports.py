"""Serving never imports ``training``, and ``spine_node`` has no import cycle.

The import graph is read from the source with ``ast`` (every import statement that runs:
module level and inside functions, not ``if TYPE_CHECKING`` blocks), and the commands are
run in subprocesses under an import hook that refuses ``training`` and records the attempt.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nodekit import CountingPACS, node_settings, storescu, wait_for, write_config

pytest_plugins = ("tests.fixtures_models",)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spine_node"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str) -> set[str]:
    """Modules (of this repository or not) that ``module`` imports when its code runs."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Edges between ``spine_node`` modules (package ``__init__`` files left out: empty)."""
    graph = {}
    for module in MODULES:
        graph[module] = {
            m for m in imports_of(module) if m in MODULES and m != module and m != "spine_node"
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_lazy_imports_and_finds_a_cycle() -> None:
    assert "spine_node.models.grader" in imports_of("spine_node.pipeline")  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_spine_node_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


@pytest.mark.parametrize(
    "module",
    sorted(MODULES),
)
def test_no_spine_node_module_imports_training(module: str) -> None:
    bad = sorted(m for m in imports_of(module) if m == "training" or m.startswith("training."))
    assert not bad, f"{module} imports {bad}"


GUARD = """
import importlib.abc, sys
class RefuseTraining(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "training" or name.startswith("training."):
            with open(sys.argv[1], "a") as fh:
                fh.write(name + "\\n")
            raise ImportError(f"the node imported {name}")
        return None
sys.meta_path.insert(0, RefuseTraining())
from spine_node.cli import main
code = main(sys.argv[2:])
leaked = sorted(m for m in sys.modules if m == "training" or m.startswith("training."))
assert not leaked, leaked
sys.exit(code)
"""


def _guarded(args: list[str], violations: Path, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", GUARD, str(violations), *args],
        env=env, cwd=str(ROOT), text=True, **kwargs,  # type: ignore[call-overload]
    )


@pytest.mark.slow
def test_analyze_never_imports_training(tmp_path: Path, dx_dataset) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "img.dcm"
    dx_dataset().save_as(image, enforce_file_format=True)
    violations = tmp_path / "violations.txt"
    proc = _guarded(["analyze", str(image), "--json", "--out", str(tmp_path / "out")], violations,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert '"status"' in out
    assert not violations.exists(), violations.read_text()
    assert list((tmp_path / "out").rglob("*.dcm"))  # the result objects were built too


@pytest.mark.slow
def test_serve_never_imports_training(tmp_path: Path, dx_dataset) -> None:  # type: ignore[no-untyped-def]
    """All roles in one process, with the demo bundle: one image received, analysed, sent."""
    pacs = CountingPACS().start()
    settings = node_settings(
        tmp_path, bundle="demo", device="cpu",
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    config = write_config(tmp_path / "node.toml", settings)
    image = tmp_path / "img.dcm"
    dx_dataset().save_as(image, enforce_file_format=True)
    violations = tmp_path / "violations.txt"
    log = tmp_path / "node.log"
    with open(log, "w") as fh:
        proc = _guarded(["serve", "--config", str(config)], violations, stderr=fh)
    try:
        wait_for(lambda: storescu(settings.port, [image]).returncode == 0, timeout=120,
                 interval=1.0)
        wait_for(lambda: "1.2.840.10008.5.1.4.1.1.88.33" in pacs.classes, timeout=300)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        pacs.stop()
    assert code == 0, log.read_text()
    assert not violations.exists(), violations.read_text()


@pytest.mark.slow
def test_demo_never_imports_training(tmp_path: Path) -> None:
    violations = tmp_path / "violations.txt"
    proc = _guarded(["demo", "--studies", "1", "--out", str(tmp_path / "demo"), "--timeout",
                     "300"], violations, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    assert not violations.exists(), violations.read_text()
    assert proc.returncode == 0, err
