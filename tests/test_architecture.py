"""Static checks of the code's shape: no import cycle, layers that point one way, and complete DVC stage deps.

The import graph comes from grimp (the library behind import-linter); it includes imports inside functions, so a
lazy import that closes a cycle counts as one.
"""
import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml

from conftest import ROOT
from ultraflux.launch import STAGE_SCRIPTS


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("ultraflux", cache_dir=None)


def find_cycle(graph) -> list[str] | None:
    """A module-level import cycle inside the package (as a path a -> ... -> a), or None."""
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph.modules):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_lazy_import_cycle():
    g = grimp.ImportGraph()
    for m in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        g.add_module(m)
    g.add_import(importer="pkg.a", imported="pkg.b")
    g.add_import(importer="pkg.b", imported="pkg.c")
    assert find_cycle(g) is None
    g.add_import(importer="pkg.c", imported="pkg.a")
    assert find_cycle(g) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_layers_point_one_way():
    """The import-linter contract in pyproject.toml (data/models/losses below training/evaluation/sampling below
    stages and cli; config and io at the bottom)."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- dvc.yaml deps
def _is_trivial_init(path: Path) -> bool:
    """A package __init__ holding only a docstring and constants cannot change a result: not required as a dep."""
    tree = ast.parse(path.read_text())
    return path.name == "__init__.py" and all(isinstance(node, (ast.Expr, ast.Assign)) for node in tree.body)


def imported_modules(script: Path, graph) -> set[str]:
    """ultraflux modules a stage script imports (anywhere in it), then everything they import, transitively."""
    direct = set()
    for node in ast.walk(ast.parse(script.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        direct |= {n for n in names if n in graph.modules}
    closure = set(direct)
    for m in direct:
        closure |= graph.find_upstream_modules(m)
    for m in list(closure):   # importing a.b.c runs a/__init__ and a/b/__init__
        parts = m.split(".")
        closure |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return closure


def module_file(name: str) -> Path:
    path = ROOT / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_every_imported_module_is_a_stage_dep(graph):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        words = stage["cmd"].split()
        # `python -m ultraflux.launch <stage>` starts the stage's script (on launch.* processes): that script's imports
        script = ROOT / (STAGE_SCRIPTS[words[-1]][0] if words[1:3] == ["-m", "ultraflux.launch"] else words[1])
        deps = [str(d) for d in stage.get("deps", [])]
        assert script.relative_to(ROOT).as_posix() in deps, f"{name}: its script is not a dep"
        for module in sorted(imported_modules(script, graph)):
            path = module_file(module)
            if _is_trivial_init(path):
                continue
            rel = path.relative_to(ROOT).as_posix()
            if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
                missing.setdefault(name, []).append(rel)
    assert not missing, f"modules imported by a stage but not among its dvc.yaml deps: {missing}"


def _requirement_names(reqs) -> set[str]:
    import re

    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


# Imported from a source checkout the user points at, not from an installed distribution.
FROM_A_CHECKOUT = {"artimuse": "curate.aesthetic.code_dir (the ArtiMuse repository has no package)"}


def test_every_imported_package_is_declared():
    """Each third-party package the library imports (anywhere, lazily too) is a dependency in pyproject.toml, or in
    an optional extra when only an optional backend imports it."""
    import importlib.metadata as md
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = _requirement_names(project["dependencies"])
    optional = set().union(*(_requirement_names(v) for v in project["optional-dependencies"].values()))
    dists = md.packages_distributions()
    g = grimp.build_graph("ultraflux", include_external_packages=True, cache_dir=None)
    undeclared = {}
    for module in sorted(m for m in g.modules if "." not in m and m != "ultraflux"):
        if module in sys.stdlib_module_names or module == "__future__" or module in FROM_A_CHECKOUT:
            continue
        # an optional backend that is not installed here is known by its import name (hpsv3, lpips, pyiqa)
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])} or {module.lower()}
        if not names & (required | optional):
            undeclared[module] = sorted(names) or ["(not installed)"]
    assert not undeclared, f"imported by ultraflux but not declared in pyproject.toml: {undeclared}"


def _is(node, module: str, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name) \
        and node.value.id == module


def process_global_uses(source: str) -> list[str]:
    """``os.chdir``, ``sys.exit``, ``sys.path.<method>(...)`` / ``sys.path = ...`` and ``raise SystemExit``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                found.append((node.lineno, "raise SystemExit (ends the caller's process)"))
        elif _is(node, "os", "chdir") or _is(node, "sys", "exit"):
            found.append((node.lineno, f"{node.value.id}.{node.attr} (moves every thread / ends the process)"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is(node.func.value, "sys", "path"):
            found.append((node.lineno, f"sys.path.{node.func.attr} (edits the import path)"))
        elif isinstance(node, ast.Assign) and any(_is(t, "sys", "path") for t in node.targets):
            found.append((node.lineno, "sys.path = (edits the import path)"))
    return [f"line {n}: {what}" for n, what in sorted(found)]


def test_process_global_finder_sees_each_kind():
    src = "import os, sys\nos.chdir('x')\nsys.path.insert(0, 'y')\nraise SystemExit(2)\nprint(sys.path)\n"
    assert [f.split(":")[0] for f in process_global_uses(src)] == ["line 2", "line 3", "line 4"]


def test_library_leaves_process_globals_alone():
    """Library code neither moves the working directory, edits ``sys.path`` nor ends the process: only the entry
    points (``ultraflux/cli``, ``stages/``, ``__main__`` blocks) decide the exit status."""
    offenders = {}
    for path in sorted((ROOT / "ultraflux").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("ultraflux/cli/") or rel == "ultraflux/launch.py":   # entry points
            continue
        if found := process_global_uses(path.read_text()):
            offenders[rel] = found
    assert not offenders, offenders
