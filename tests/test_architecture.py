"""The architecture ARCHITECTURE.md draws, checked: imports point one way, the deploy side needs no torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_EXPORT

PACKAGE = Path(__file__).resolve().parents[1] / "hgdeploy"
# The rooms, lowest first (ARCHITECTURE.md). A module may import its own room and the rooms below it.
ROOMS = [
    ("foundation", {"errors", "config", "progress", "contract", "preprocess", "plan", "outputs", "memory"}),
    ("layers", {"layers"}),
    ("models", {"models"}),
    ("adapters", {"adapters"}),
    ("plan/export", {"recipe", "patching", "export", "space"}),
    ("passes/lint", {"passes", "lint", "graph_flops", "fp16"}),
    ("backends", {"backends"}),
    ("checks/bench/report", {"checks", "bench", "flops", "images", "report", "datasets", "task_metrics", "scoring",
                             "eval_report", "sample_data", "replay", "downscale", "tune_report"}),
    ("pipeline", {"pipeline", "deploy", "evaluate", "tune"}),
    ("cli", {"cli"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> int:
    """Index of the module's room in ROOMS; the package's own __init__ belongs to the foundation."""
    first = module.split(".")[1] if "." in module else ""
    for rank, (_, names) in enumerate(ROOMS):
        if first in names or (first == "" and "errors" in names):
            return rank
    raise AssertionError(f"{module} belongs to no room: add it to ROOMS and to ARCHITECTURE.md")


def imports(path: Path, known: set[str]) -> set[str]:
    """hgdeploy modules a file imports, lazily or not; `from pkg import mod` counts as importing pkg.mod."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hgdeploy")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hgdeploy"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found & known


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_every_module_has_a_room():
    for name in modules():
        room(name)


def test_imports_never_point_to_a_higher_room():
    upward = [f"{a} ({ROOMS[room(a)][0]}) imports {b} ({ROOMS[room(b)][0]})"
              for a, targets in graph().items() for b in targets if room(b) > room(a)]
    assert upward == []


def find_cycles(g: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, written as the cycle it closes."""
    state: dict[str, str] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_graph_has_no_cycle():
    assert find_cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]


def test_the_graph_check_would_catch_an_upward_import(tmp_path):
    """The checks above must be able to fail: a layer importing the CLI is an upward import."""
    fake = tmp_path / "layers.py"
    fake.write_text("from hgdeploy.cli import main\n")
    assert imports(fake, set(modules())) == {"hgdeploy.cli"} and room("hgdeploy.cli") > room("hgdeploy.layers")


BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_the_deploy_side_imports_no_torch():
    done = python("import sys, hgdeploy.lint, hgdeploy.passes, hgdeploy.backends, hgdeploy.deploy, hgdeploy.cli, "
                  "hgdeploy.scoring, hgdeploy.eval_report, hgdeploy.sample_data; sys.exit('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", [
    ["optimize"], ["build"], ["bench"], ["lint", "{out}/patched.onnx"],
])
def test_deploy_commands_run_where_torch_cannot_be_imported(small_export, command, tmp_path):
    quick = tmp_path / "quick.toml"
    quick.write_text('[engine]\nbackend = "onnxruntime"\n[bench]\nwarmup = 1\nruns = 2\n')
    args = [a.format(out=small_export) for a in command]
    if command[0] != "lint":
        args += ["--out", str(small_export), "--engine", str(quick)] + [a for s in SMALL_EXPORT for a in ("--set", s)]
    done = python(BLOCK_TORCH + f"from hgdeploy.cli import main\nsys.exit(main({args!r} + ['--json']))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_the_torch_block_works():
    """Without this the test above could pass with torch imported after all."""
    done = python(BLOCK_TORCH + "import torch")
    assert done.returncode != 0 and "blocked by the test" in done.stderr
