"""The architecture ARCHITECTURE.md draws, checked: imports point one way, the deploy side needs no torch."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_EXPORT

PACKAGE = Path(__file__).resolve().parents[1] / "hgdeploy"
ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"
SCRIPTS = PACKAGE.parent / "scripts"


def rooms() -> list[str]:
    """The rooms, lowest first: the package's folders, in the order `hgdeploy.ROOMS` gives them (the one place
    the order is written); a folder missing from it, or a name without a folder, fails here."""
    import hgdeploy

    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert sorted(hgdeploy.ROOMS) == folders, f"hgdeploy.ROOMS {hgdeploy.ROOMS} != the package's folders {folders}"
    return list(hgdeploy.ROOMS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> int:
    """Index of the module's room: the folder it lives in."""
    parts = module.split(".")
    assert len(parts) > 1, f"{module} is the package itself, which is no room"
    return rooms().index(parts[1])


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


def test_every_module_lives_in_a_room():
    """No module beside the rooms: the package's own __init__ holds only the room order and the public names."""
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside every room folder: {loose}"
    for name in modules():
        if name != "hgdeploy":
            room(name)


def test_the_package_init_imports_nothing():
    """The public façade names its modules as strings, imported on first use: no import edge leaves it."""
    assert imports(PACKAGE / "__init__.py", set(modules())) == set()


def test_no_room_imports_the_facade():
    """The rooms import each other directly; `from hgdeploy import NAME` is for scripts and users."""
    assert [a for a, targets in graph().items() if a != "hgdeploy" and "hgdeploy" in targets] == []


def test_every_public_name_resolves():
    import hgdeploy

    missing = []
    for name in hgdeploy.__all__:
        try:
            getattr(hgdeploy, name)
        except (AttributeError, ImportError) as exc:
            missing.append(f"{name}: {exc}")
    assert missing == []
    assert set(hgdeploy.PUBLIC.values()) <= set(modules()), "a public name points outside the package's modules"


def test_import_hgdeploy_loads_no_submodule():
    """The façade is lazy: importing the package imports none of its rooms (nor torch)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", "import hgdeploy, sys; print(hgdeploy.__file__); "
                           "print(sorted(m for m in sys.modules if m.startswith('hgdeploy.') or m == 'torch'))"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    where, loaded = done.stdout.splitlines()
    assert Path(where) == PACKAGE / "__init__.py" and loaded == "[]"


def private_imports(path: Path) -> list[str]:
    """What a script takes from hgdeploy beyond the public names (`hgdeploy.__all__`): a submodule imported
    (`import hgdeploy.x`, `from hgdeploy.x import ...`) or a name the package does not offer."""
    import hgdeploy

    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("hgdeploy.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hgdeploy":
            if node.module != "hgdeploy":
                found.append(node.module)
            else:
                found += [f"hgdeploy.{a.name}" for a in node.names if a.name not in hgdeploy.__all__]
    return found


def test_scripts_use_only_the_public_api():
    scripts = sorted(SCRIPTS.glob("*.py"))
    assert len(scripts) >= 10
    private = {p.name: private_imports(p) for p in scripts if private_imports(p)}
    assert private == {}, f"scripts importing past hgdeploy.__all__: {private}"


def test_the_public_api_check_would_catch_a_private_import(tmp_path):
    fake = tmp_path / "script.py"
    fake.write_text("import hgdeploy\nfrom hgdeploy import exit_code\nfrom hgdeploy.core.errors import exit_code\n"
                    "import hgdeploy.graph.flops\nfrom hgdeploy import onnx_gflops\n")
    assert private_imports(fake) == ["hgdeploy.core.errors", "hgdeploy.graph.flops", "hgdeploy.onnx_gflops"]


def test_no_script_edits_sys_path():
    """The package is installed: a script finds it (and scripts/common.py beside it) without path edits."""
    edits = [p.name for p in SCRIPTS.glob("*.py") if re.search(r"sys\.path\.(insert|append)", p.read_text())]
    assert edits == []


def test_architecture_md_maps_the_rooms_in_order():
    """ARCHITECTURE.md is the one prose map: its table names every room folder, lowest first."""
    listed = re.findall(r"^\| `([a-z_]+)/` \|", ARCHITECTURE.read_text(), flags=re.M)
    assert listed == rooms()


def test_imports_never_point_to_a_higher_room():
    upward = [f"{a} imports {b}, a higher room" for a, targets in graph().items() if a != "hgdeploy"
              for b in targets if room(b) > room(a)]
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
    assert imports(fake, set(modules())) == {"hgdeploy.cli.main"} and room("hgdeploy.cli.main") > room("hgdeploy.layers")


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
    done = python("import sys, hgdeploy.graph.lint, hgdeploy.graph.passes, hgdeploy.backends, hgdeploy.pipeline.engines, hgdeploy.pipeline.triton, hgdeploy.graph.folder, hgdeploy.graph.deploy, hgdeploy.cli, hgdeploy.cli.commands, "
                  "hgdeploy.evaluation.scoring, hgdeploy.evaluation.report, hgdeploy.evaluation.samples; sys.exit('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", [
    ["optimize"], ["build"], ["bench"], ["lint", "{out}/patched.onnx"], ["triton", "--repo", "{tmp}/repo"],
])
def test_deploy_commands_run_where_torch_cannot_be_imported(small_export, command, tmp_path):
    quick = tmp_path / "quick.toml"
    quick.write_text('[engine]\nbackend = "onnxruntime"\n[bench]\nwarmup = 1\nruns = 2\n')
    args = [a.format(out=small_export, tmp=tmp_path) for a in command]
    if command[0] != "lint":
        args += ["--out", str(small_export), "--engine", str(quick)] + [a for s in SMALL_EXPORT for a in ("--set", s)]
    done = python(BLOCK_TORCH + f"from hgdeploy.cli import main\nsys.exit(main({args!r} + ['--json']))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_the_torch_block_works():
    """Without this the test above could pass with torch imported after all."""
    done = python(BLOCK_TORCH + "import torch")
    assert done.returncode != 0 and "blocked by the test" in done.stderr


def callers(name: str) -> set[str]:
    """Modules of the package that call `name` (a plain function name, or an attribute of anything but
    graph-surgeon, whose `gs.export_onnx` is another function)."""
    found = set()
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                external = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "gs"
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                called = None if external else called
                if called == name:
                    found.add(module)
    return found


def test_one_road_writes_graphs_from_models():
    """Only the export road exports models; the passes and the profile's twins (fused, fp16) are written there and
    in `hgdeploy optimize` (which rewrites an existing folder's patched.opt.onnx and so its patched twins), and by
    graph.deploy.with_twins, which derives the twins an export made for another profile lacks."""
    assert callers("export_onnx") == {"hgdeploy.pipeline.road"}
    assert callers("write_twins") == {"hgdeploy.pipeline.road", "hgdeploy.pipeline.engines", "hgdeploy.graph.deploy"}
    assert callers("optimize_patched") == {"hgdeploy.pipeline.road", "hgdeploy.pipeline.engines"}
    assert callers("write_deployable") == {"hgdeploy.pipeline.commands", "hgdeploy.evaluation.run",
                                           "hgdeploy.tune.latency"}
    # its two halves: a big model's `run` exports in one fresh process and hands finish_deployable to another
    assert callers("export_graphs") == {"hgdeploy.pipeline.road", "hgdeploy.pipeline.commands"}
    assert callers("finish_deployable") == {"hgdeploy.pipeline.road"}
