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
