"""The layer rule (docs/architecture.md): import-linter's contracts hold on the tree, and fail, naming the contract,
on a planted upward import, a planted orchestration import in the method, and a planted cycle; an independent
check finds no import cycle at all (every import statement, at module level or inside a function)."""
import ast
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": cwd}  # the tree under test first, before the installed (editable) livr
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_contracts_hold_on_the_tree():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "3 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("where,line,contract", [
    ("livr/method/mask.py", "from livr.training import train  # noqa", "livr's layers"),  # upward
    ("livr/data/loader.py", "from livr.backbones import registry  # noqa", "livr's layers"),  # independent siblings
    ("livr/backbones/base.py", "import deepspeed  # noqa", "never import ray, deepspeed or mlflow"),
    ("livr/training/checkpoint.py", "from livr.training import train  # noqa", "no import cycles"),
])
def test_a_planted_import_breaks_its_contract(tmp_path, where, line, contract):
    tree = str(tmp_path)
    shutil.copytree(os.path.join(ROOT, "livr"), os.path.join(tree, "livr"), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tree)
    path = os.path.join(tree, where)
    with open(path) as f:
        src = f.read()
    with open(path, "w") as f:
        f.write(src.replace("\nimport ", f"\ndef _planted():\n    {line}\n\n\nimport ", 1))  # even inside a function
    res = _lint(tree)
    assert res.returncode != 0
    broken = res.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, res.stdout[-3000:]


def _imports() -> dict[str, set[str]]:
    """Module -> the livr modules it imports (every import statement, relative ones resolved)."""
    mods = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "livr")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    graph = {}
    for mod, path in mods.items():
        pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        out = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
                out |= subs
                if len(subs) < len(node.names) and base in mods:
                    out.add(base)
        graph[mod] = out - {mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_anywhere():
    graph = _imports()
    assert len(graph) > 60 and "livr.training.train" in graph["livr.cluster.ray_train"]  # the walk sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({**graph, "livr.method.mask": graph["livr.method.mask"] | {"livr.backbones.base"}}) is not None
