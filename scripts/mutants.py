"""Mutation testing of the numerical core: does a wrong operator or constant fail a test?

Mutants are generated from each module's AST, so the list is the same on every run: every binary operator
swapped (+ -, * /, // *, ** *), every `a + b` / `a - b` without its right term, every comparison flipped
(< <=, > >=, == !=, is / is not, in / not in), every other condition of an if negated, every unary minus dropped and every numeric constant changed
(an int n -> n + 1, except those that pick an axis or an element; a float 0 -> 1, 1 -> 2, anything else -> 1).
Where a module has more than its cap, a
sample seeded by the module's path is taken. Each mutant is written into a temporary copy of the repository
and the module's focused tests run there (pytest -x, in a forked child of this process that has torch and
pytest imported already, with a timeout from the unmutated run): a failing, erroring or timed-out run kills
it; a passing one lets it survive. The repository itself is never written, except the results.

Survivors are judged by hand in scripts/mutants_verdicts.toml (keyed by the mutant's id, which names the
function and the change, not a line number): "equivalent" (no input can tell it apart: why), "harmless" (an input
can, but what changes is within what the code promises, e.g. a bisection's last step: why) or "gap" (a test now
kills it: --recheck names which). Writes scripts/results/mutants.json and the README block between the mutants
markers.

    python scripts/mutants.py                      # every module (about 40 min on 2 busy cores)
    python scripts/mutants.py --only layers/tau.py  # one module (no README, no results file)
    python scripts/mutants.py --list               # the mutants, no tests run
    python scripts/mutants.py --recheck            # rerun the survivors of scripts/results/mutants.json (~8 min)
    python scripts/mutants.py --only measure/checks.py --update  # run these modules again, keep the others' results
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from common import publish

from hgdeploy import REPO_ROOT, UserError, exit_code

RESULTS = REPO_ROOT / "scripts" / "results" / "mutants.json"
VERDICTS = REPO_ROOT / "scripts" / "mutants_verdicts.toml"
README = REPO_ROOT / "README.md"

# module (under hgdeploy/) -> (the top-level names mutated, None for all; the focused tests, as pytest arguments;
# the most mutants tried). The caps keep the whole run near 40 minutes on 2 busy cores.
LAYERS = ["tests/test_reference.py", "tests/test_layers.py", "tests/test_official.py", "tests/test_window_layers.py"]
TARGETS: dict[str, tuple[tuple[str, ...] | None, list[str], int]] = {
    "layers/clustering.py": (None, LAYERS + ["-k", "not export"], 30),
    "layers/reconstruction.py": (None, LAYERS + ["tests/test_pool_baseline.py", "-k", "not export and not end_to_end"],
                                 30),
    "layers/tables.py": (None, LAYERS + ["-k", "not export"], 30),
    "layers/mixing.py": (None, LAYERS + ["-k", "not export"], 10),
    "layers/windows.py": (None, ["tests/test_window_layers.py", "tests/test_reference.py", "tests/test_official.py",
                                 "-k", "not export"], 30),
    "layers/tau.py": (None, ["tests/test_reference.py", "tests/test_tau_auto.py", "-k", "tau and not export"], 20),
    "measure/checks.py": (None, ["tests/test_checks_flops.py", "tests/test_gates.py", "tests/test_definitions.py",
                                 "-k", "not check_exits_1"], 30),
    "tune/space.py": (("Budget", "parse_budget"), ["tests/test_definitions.py", "tests/test_tune.py", "-k",
                                                    "budget"], 20),
    "evaluation/metrics.py": (None, ["tests/test_definitions.py", "tests/test_eval.py", "-k",
                                     "by_hand or standard_formulas or curves or saliency_mae or disparity_alignment"],
                              30),
    "graph/passes.py": (None, ["tests/test_passes.py", "tests/test_definitions.py", "-k",
                               "not full_list or a_term_scaled"], 30),
}

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
          ast.Pow: ast.Mult}
COMPARES = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**", ast.Lt: "<",
          ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not",
          ast.In: "in", ast.NotIn: "not in"}


@dataclass
class Mutant:
    id: str  # module:function:change#n, n counting the same change in the same function
    module: str
    line: int
    function: str
    change: str
    source: str  # the mutated line, stripped
    status: str = "untried"  # killed, survived, timeout (killed), error (the copy did not compile)
    killed_by: str | None = None
    seconds: float | None = None


def _changed_constant(value: float) -> float:
    if isinstance(value, int):
        return value + 1
    return 1.0 if value == 0 else 2.0 if value == 1 else 1.0


def _replacements(node: ast.AST) -> list[tuple[str, ast.AST, ast.AST]]:
    """(what changed, the new node, the node it replaces: `node`, or an if's condition) for every mutant of `node`."""
    out: list[tuple[str, ast.AST]] = []
    if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
        new = copy.deepcopy(node)
        new.op = BINOPS[type(node.op)]()
        out.append((f"{SYMBOL[type(node.op)]} -> {SYMBOL[type(new.op)]}", new))
        if isinstance(node.op, (ast.Add, ast.Sub)):
            out.append((f"drop the right term of {SYMBOL[type(node.op)]}", copy.deepcopy(node.left)))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARES:
                new = copy.deepcopy(node)
                new.ops[i] = COMPARES[type(op)]()
                out.append((f"{SYMBOL[type(op)]} -> {SYMBOL[type(new.ops[i])]}", new))
    elif isinstance(node, (ast.If, ast.IfExp, ast.While)) and not isinstance(node.test, ast.Compare):
        new = copy.deepcopy(node.test)
        return [("negate the condition", ast.UnaryOp(ast.Not(), new), node.test)]
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and not isinstance(node.operand, ast.Constant):
        out.append(("drop the unary minus", copy.deepcopy(node.operand)))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        changed = _changed_constant(node.value)
        out.append((f"{node.value!r} -> {changed!r}", ast.Constant(changed)))
    return [(change, new, node) for change, new in out]


def _is_axis(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """An integer that picks an axis or an element (x.sum(-1), x.shape[0], dim=1): changing one breaks a shape,
    which any test that runs the line sees; such mutants would crowd out the numerical ones."""
    if not (isinstance(node, ast.Constant) and type(node.value) is int):
        return False
    child, parent = node, parents.get(node)
    if isinstance(parent, ast.UnaryOp):
        child, parent = parent, parents.get(parent)
    if isinstance(parent, ast.Subscript) and child is parent.slice:
        return True
    if isinstance(parent, ast.keyword) and parent.arg in ("dim", "axis", "p", "keepdim"):
        return True
    return isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute) and child in parent.args


def _skipped(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside an f-string, an annotation or a raise (no behaviour of the numbers to test), or an axis."""
    if _is_axis(node, parents):
        return True
    while node in parents:
        parent = parents[node]
        if isinstance(parent, (ast.JoinedStr, ast.Raise)):
            return True
        if isinstance(parent, (ast.arg, ast.AnnAssign)) and node is getattr(parent, "annotation", None):
            return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is parent.returns:
            return True
        node = parent
    return False


def _function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str:
    names = []
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
    return ".".join(reversed(names)) or "<module>"


def mutants_of(module: str, source: str, scope: tuple[str, ...] | None) -> list[tuple[Mutant, str]]:
    """Every mutant of the module (in source order) with the mutated module's text."""
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    raw = source.encode()
    found: list[tuple[Mutant, str]] = []
    seen: dict[str, int] = {}
    nodes = sorted((n for n in ast.walk(tree) if hasattr(n, "lineno")), key=lambda n: (n.lineno, n.col_offset))
    for node in nodes:
        function = _function(node, parents)
        if scope is not None and function.split(".")[0] not in scope:
            continue
        if _skipped(node, parents):
            continue
        for change, new, replaced in _replacements(node):
            start = offsets[replaced.lineno - 1] + replaced.col_offset
            end = offsets[replaced.end_lineno - 1] + replaced.end_col_offset
            text = f"({ast.unparse(new)})"
            mutated = (raw[:start] + text.encode() + raw[end:]).decode()
            try:
                compile(mutated, module, "exec")
            except SyntaxError:
                continue
            key = f"{module}:{function}:{change}"
            seen[key] = seen.get(key, 0) + 1
            changed_line = mutated.encode()[offsets[node.lineno - 1]:].decode().splitlines()[0].strip()
            found.append((Mutant(f"{key}#{seen[key]}", module, node.lineno, function, change, changed_line), mutated))
    return found


def sample(items: list, cap: int, seed: str) -> list:
    """At most `cap` of the items, the same ones on every run, in their order."""
    if len(items) <= cap:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), cap))
    return [items[i] for i in keep]


def copy_repository(into: Path) -> Path:
    """The package, tests, recipes, profiles and scripts in a temporary folder, without caches or outputs."""
    root = into / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "runs", "datasets", "*.onnx", "*.engine")
    for name in ("hgdeploy", "tests", "export", "engines", "scripts"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "ARCHITECTURE.md"):
        shutil.copy2(REPO_ROOT / name, root / name)
    return root


def run_tests(root: Path, args: list[str], timeout: float, log: Path) -> tuple[str, float, str | None]:
    """("passed" | "failed" | "timeout", seconds, the first failing test) of pytest in `root`, in a forked child
    that imports the package from `root` afresh (no bytecode read or written)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: its own process group, so a timeout ends the commands its tests started too
        code = 3
        try:
            os.setsid()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            for name in [m for m in sys.modules if m.split(".")[0] in ("hgdeploy", "common", "conftest", "tests")]:
                del sys.modules[name]
            sys.dont_write_bytecode = True
            os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
            os.environ["PYTHONPATH"] = str(root)  # for the commands the tests start
            os.chdir(root)
            import pytest

            # pytest's own pythonpath option puts the copy first on the path, ahead of the installed package
            code = int(pytest.main(["-x", "-q", "-n", "0", "-p", "no:cacheprovider", "-o", f"pythonpath={root}",
                                    *args]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - start, None
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) == 0:
        return "passed", seconds, None
    text = log.read_text(errors="replace")
    first = next((line.split(" ", 1)[1].split(" - ")[0] for line in text.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))), None)
    return "failed", seconds, first


def try_module(root: Path, module: str, chosen: list[tuple[Mutant, str]], args: list[str], log: Path) -> dict:
    """The unmutated module's tests (they must pass), then every chosen mutant against them."""
    path = root / "hgdeploy" / module
    original = path.read_text()
    verdict, base_s, failing = run_tests(root, args, 900, log)
    if verdict != "passed":
        raise SystemExit(f"{module}: its tests fail unmutated ({failing}); see {log}")
    timeout = 3 * base_s + 15
    print(f"{module}: tests pass unmutated in {base_s:.0f} s; {len(chosen)} mutants, timeout {timeout:.0f} s each",
          file=sys.stderr, flush=True)
    try:
        for mutant, text in chosen:
            path.write_text(text)
            verdict, seconds, failing = run_tests(root, args, timeout, log)
            mutant.status = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[verdict]
            mutant.killed_by, mutant.seconds = failing, round(seconds, 1)
            print(f"  {mutant.status:8s} {seconds:5.1f} s  line {mutant.line}: {mutant.change:28s} {mutant.source[:70]}",
                  file=sys.stderr, flush=True)
    finally:
        path.write_text(original)
    return {"module": module, "tests": args, "baseline_s": round(base_s, 1), "timeout_s": round(timeout, 1)}


VERDICT_KINDS = ("gap", "equivalent", "harmless")


def load_verdicts() -> dict[str, dict]:
    """{mutant id: its [[verdict]] table}; each must say which kind and why."""
    if not VERDICTS.is_file():
        return {}
    verdicts = {}
    for v in tomllib.loads(VERDICTS.read_text()).get("verdict", []):
        if v.get("verdict") not in VERDICT_KINDS or not v.get("why") or v.get("id") in verdicts:
            raise SystemExit(f"{VERDICTS}: {v.get('id')!r} needs one verdict, one of {VERDICT_KINDS}, and a why")
        verdicts[v["id"]] = v
    return verdicts


def summarise(modules: list[dict], mutants: list[Mutant], verdicts: dict[str, dict]) -> dict:
    survivors = [m for m in mutants if m.status == "survived"]
    rows = []
    for info in modules:
        mine = [m for m in mutants if m.module == info["module"]]
        rows.append(info | {"generated": info["generated"], "tried": len(mine),
                            "killed": sum(m.status in ("killed", "timeout") for m in mine),
                            "survived": sum(m.status == "survived" for m in mine)})
    return {"tried": len(mutants), "killed": sum(m.status in ("killed", "timeout") for m in mutants),
            "survived": len(survivors), "modules": rows,
            "survivors": [asdict(m) | {k: v for k, v in verdicts.get(m.id, {}).items() if k != "id"}
                          for m in survivors],
            "mutants": [asdict(m) for m in mutants]}


def render(result: dict) -> str:
    lines = ["| module | mutants generated | tried | killed | survived | focused tests (unmutated run) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in result["modules"]:
        tests = " ".join(a for a in r["tests"] if a.startswith("tests/")).replace("tests/", "")
        lines.append(f"| `{r['module']}` | {r['generated']} | {r['tried']} | {r['killed']} | {r['survived']} | "
                     f"{tests} ({r['baseline_s']:.0f} s) |")
    lines += ["", f"{result['tried']} mutants tried, {result['killed']} killed, {result['survived']} survived."]
    if result.get("rechecked"):
        lines[-1] += (f" Rechecked after the tests that answer them were added: {result['rechecked']['killed']} of "
                      f"the {result['rechecked']['tried']} survivors are killed now.")
    if result["survivors"]:
        kinds = [s.get("verdict", "not judged") for s in result["survivors"]]
        caught = sum(s.get("verdict") == "gap" and s.get("rechecked") == "killed" for s in result["survivors"])
        lines[-1] += (f" Verdicts on the {len(kinds)} survivors: {kinds.count('gap')} gaps ({caught} killed now), "
                      f"{kinds.count('equivalent')} equivalent, {kinds.count('harmless')} harmless, "
                      f"{kinds.count('not judged')} not judged yet.")
        lines += ["", "| survivor | change | verdict |", "|---|---|---|"]
        for s in result["survivors"]:
            lines.append(f"| `{s['module']}` {s['function']} (line {s['line']}) | `{s['source'][:60]}`: {s['change']} "
                         f"| {_verdict(s)} |")
    lines += ["", "Produced by `python scripts/mutants.py` (verdicts: `scripts/mutants_verdicts.toml`)."]
    return "\n".join(lines)


def _verdict(s: dict) -> str:
    """A survivor's verdict cell: the verdict and why, and what the last recheck gave (the test that killed it)."""
    now = s.get("rechecked")
    if now == "killed":
        test = (s.get("rechecked_killed_by") or "").replace("tests/", "")
        now = f"killed now by `{test}`" if test else "killed now (timed out)"
    elif now == "survived":
        now = "still survives"
    elif now == "gone":
        now = "no longer generated (the code changed)"
    if "verdict" not in s:
        return "not judged yet" + (f" ({now})" if now else "")
    return f"**{s['verdict']}**" + (f", {now}" if now else "") + f": {s['why']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="modules under hgdeploy/ (default: every target)")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    parser.add_argument("--recheck", action="store_true", help="rerun the survivors of the results file")
    parser.add_argument("--check", action="store_true", help="print the README block, write nothing")
    parser.add_argument("--update", action="store_true",
                        help="with --only: those modules' results replace theirs in the results file (their code "
                             "changed); the other modules' results and rechecks are kept")
    args = parser.parse_args()
    if args.update and not args.only:
        raise UserError("--update needs --only MODULE ...: the modules whose results it replaces")
    verdicts = load_verdicts()
    if args.recheck:
        return recheck(verdicts, args.check)
    names = args.only or list(TARGETS)
    modules, chosen = [], {}
    for module in names:
        scope, tests, cap = TARGETS[module]
        every = mutants_of(module, (REPO_ROOT / "hgdeploy" / module).read_text(), scope)
        chosen[module] = sample(every, cap, module)
        modules.append({"module": module, "generated": len(every)})
        print(f"{module}: {len(every)} mutants, {len(chosen[module])} tried", file=sys.stderr)
    if args.list:
        for module in names:
            for m, _ in chosen[module]:
                print(f"{m.id}  (line {m.line}) {m.source}")
        return 0
    import pytest  # noqa: F401  imported here once, so every forked child has it (and torch) already
    import torch  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="hgdeploy-mutants-") as tmp:
        root = copy_repository(Path(tmp))
        for info in modules:
            scope, tests, _ = TARGETS[info["module"]]
            info |= try_module(root, info["module"], chosen[info["module"]], tests, Path(tmp) / "pytest.log")
    tried = [m for module in names for m, _ in chosen[module]]
    if args.update:
        result = updated(modules, tried, verdicts)
        publish(render(result), "mutants", README, RESULTS, result, args.check)
        return 0
    result = summarise(modules, tried, verdicts)
    publish(render(result), "mutants", README, RESULTS, result, args.check or args.only is not None)
    return 0


def updated(modules: list[dict], tried: list[Mutant], verdicts: dict[str, dict]) -> dict:
    """The results file with `modules` run again: their rows, mutants and survivors replaced, the other modules'
    kept, with what their last recheck gave (a module whose code changed gets new mutant ids, which a recheck can
    only call "no longer generated")."""
    import json

    old = json.loads(RESULTS.read_text())
    names = {info["module"] for info in modules}
    rows = {r["module"]: r for r in old["modules"] if r["module"] not in names} | {i["module"]: i for i in modules}
    kept = [Mutant(**m) for m in old["mutants"] if m["module"] not in names]
    result = summarise([rows[name] for name in TARGETS if name in rows], kept + tried, verdicts)
    before = {s["id"]: s for s in old["survivors"] if s["module"] not in names}
    for s in result["survivors"]:
        s |= {k: before[s["id"]][k] for k in ("rechecked", "rechecked_killed_by", "line", "source")
              if k in before.get(s["id"], {})}
    rechecked = [s for s in result["survivors"] if "rechecked" in s]
    if rechecked:
        result["rechecked"] = {"tried": len(rechecked), "killed": sum(s["rechecked"] == "killed" for s in rechecked)}
    return result


def recheck(verdicts: dict[str, dict], check: bool) -> int:
    """Rerun the survivors recorded in the results file against today's tests; each records what it gives now."""
    import json

    import pytest  # noqa: F401
    import torch  # noqa: F401

    result = json.loads(RESULTS.read_text())
    mutants = [Mutant(**{k: v for k, v in m.items()}) for m in result["mutants"]]
    survivors = [m for m in mutants if m.status == "survived"]
    killed = 0
    with tempfile.TemporaryDirectory(prefix="hgdeploy-mutants-") as tmp:
        root = copy_repository(Path(tmp))
        for module in sorted({m.module for m in survivors}):
            scope, tests, _ = TARGETS[module]
            today = {m.id: (m, t) for m, t in mutants_of(module, (root / "hgdeploy" / module).read_text(), scope)}
            todo = [today[m.id] for m in survivors if m.module == module and m.id in today]
            try_module(root, module, todo, tests, Path(tmp) / "pytest.log")
            for s in result["survivors"]:
                if s["module"] != module:
                    continue
                if s["id"] not in today:  # the code changed under it: it cannot be rerun
                    s["rechecked"], s["rechecked_killed_by"] = "gone", None
                    continue
                now = today[s["id"]][0]
                s["line"], s["source"] = now.line, now.source  # where it is in today's code
                s["rechecked"] = "killed" if now.status in ("killed", "timeout") else "survived"
                s["rechecked_killed_by"] = now.killed_by
                killed += s["rechecked"] == "killed"
    for s in result["survivors"]:
        s.pop("verdict", None), s.pop("why", None)  # today's verdicts file alone says what each is
        s |= {k: v for k, v in verdicts.get(s["id"], {}).items() if k != "id"}
    for stray in sorted(set(verdicts) - {s["id"] for s in result["survivors"]}):
        print(f"note: {VERDICTS.name} judges {stray!r}, which is no survivor", file=sys.stderr)
    result["rechecked"] = {"tried": len(survivors), "killed": killed}
    publish(render(result), "mutants", README, RESULTS, result, check)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "mutants.py"))
