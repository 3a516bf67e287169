"""The layout's promises: thin scripts over the package, and no edits of the import path anywhere."""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f for f in os.listdir(os.path.join(REPO, "experiments")) if f.endswith(".py"))
PYTHON_FILES = sorted(
    os.path.join(root, f)
    for top in ("softnce", "configs", "experiments", "tests")
    for root, _, files in os.walk(os.path.join(REPO, top))
    for f in files
    if f.endswith(".py")
)


def _imported_modules(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_import_only_the_package(script):
    imported = _imported_modules(os.path.join(REPO, "experiments", script))
    assert imported and all(name == "softnce" or name.startswith("softnce.") for name in imported), imported


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_nothing_edits_the_import_path_or_loads_files_by_path(path):
    tree = ast.parse(open(path).read())
    edits = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == "path"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not edits, f"{path} touches the import path at lines {edits}"
    by_path = [node.lineno for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr in ("spec_from_file_location", "run_path")]
    assert not by_path, f"{path} loads Python files by path at lines {by_path}"


def test_no_tensorflow_anywhere():
    """No module imports TensorFlow, no extra depends on it, and the test environment does not hold it."""
    importers = [os.path.relpath(p, REPO) for p in PYTHON_FILES
                 if any(name == "tensorflow" or name.startswith("tensorflow.") for name in _imported_modules(p))]
    assert not importers, importers
    setup = open(os.path.join(REPO, "setup.py")).read()
    assert "tensorflow-cpu" not in setup and '"tensorflow>' not in setup and '"tensorflow"' not in setup
    import importlib.util

    assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed in the test environment"


@pytest.mark.parametrize("script", ["toy_experiment.py", "digits_comparison.py"])
def test_script_command_line_answers(script):
    proc = subprocess.run([sys.executable, os.path.join("experiments", script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--out" in proc.stdout, proc.stderr


def test_release_files_name_the_package_version():
    import softnce

    citation = open(os.path.join(REPO, "CITATION.cff")).read()
    changelog = open(os.path.join(REPO, "CHANGELOG.md")).read()
    assert f"\nversion: {softnce.__version__}\n" in citation
    assert changelog.split("\n## ")[1].startswith(f"{softnce.__version__} ")  # the newest entry first
    assert "Apache License" in open(os.path.join(REPO, "LICENSE")).read() and "license: Apache-2.0" in citation


# The stack, bottom first: a module imports only from its own layer and the layers below it.
LAYERS = {
    "core": ("softnce", "softnce._extras", "softnce.registry", "softnce.config_checks", "softnce.targets",
             "softnce.losses", "softnce.cli"),
    "components": ("softnce.config_utils", "softnce.configs", "softnce.data", "softnce.models", "softnce.optim",
                   "softnce.checkpointing", "softnce.checkpoint_metadata", "softnce.distributed", "softnce.metrics",
                   "softnce.metric_writer", "softnce.plotting", "softnce.failures", "softnce.preemption",
                   "softnce.watchdog", "softnce.export_loader", "softnce.distill"),
    "steps": ("softnce.steps",),
    "assembly": ("softnce.assembly",),
    "evaluation": ("softnce.evaluation",),
    "loop": ("softnce.train",),
    "entry points": ("softnce.main", "softnce.evaluate", "softnce.inference", "softnce.export",
                     "softnce.experiments"),
}
LEVEL = {prefix: level for level, prefixes in enumerate(LAYERS.values()) for prefix in prefixes}


def _module_files() -> dict[str, str]:
    """``{module name: file}`` of the package and the configs (installed as ``softnce.configs``)."""
    found = {}
    for path in PYTHON_FILES:
        rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
        if rel[0] == "configs":
            rel = ["softnce", *rel]
        elif rel[0] != "softnce":
            continue
        found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
    return found


def _layer(module: str) -> int:
    if module == "softnce":
        return LEVEL["softnce"]
    prefix = max((p for p in LEVEL if p != "softnce" and (module == p or module.startswith(p + "."))), key=len)
    return LEVEL[prefix]


def _imports(path: str, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports anywhere (in functions too), except under ``if TYPE_CHECKING``."""
    tree = ast.parse(open(path).read())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "softnce"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "softnce":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = _module_files()
    return {module: _imports(path, set(files)) - {module} for module, path in files.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in _import_graph() if m != "softnce" and not any(
        m == p or m.startswith(p + ".") for p in LEVEL if p != "softnce")]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    names = list(LAYERS)
    upward = [f"{m} ({names[_layer(m)]}) imports {d} ({names[_layer(d)]})"
              for m, deps in sorted(_import_graph().items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_import_checks_see_imports_in_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from softnce import train\n"
                    "def f():\n    from softnce import steps, losses\n    import softnce.assembly\n")
    assert _imports(str(path), {"softnce.steps", "softnce.losses", "softnce.assembly"}) == {
        "softnce.steps", "softnce.losses", "softnce.assembly"}
