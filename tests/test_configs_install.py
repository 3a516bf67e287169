"""Configs load the same way from an editable install (the test environment), a regular install and any
working directory: ``softnce.configs`` is the top-level ``configs/`` folder in each (softnce/__init__.py).

The regular install is a real ``pip install --no-deps --target`` of a copy of the clone. Run from the
clone's root, the clone's ``softnce/`` shadows that installed copy and has no ``package_dir`` mapping;
run from elsewhere, the installed copy is used."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = ("import softnce, softnce.configs; from softnce.configs import digits; "
        "print(softnce.__file__, softnce.configs.__path__[0], digits.get_config().model.name)")


@pytest.fixture(scope="module")
def regular_install(tmp_path_factory):
    """``(site folder, clone copy)``: the package installed, not editable, from a copy of the clone."""
    root = tmp_path_factory.mktemp("install")
    clone = root / "clone"
    for name in ("softnce", "configs"):
        shutil.copytree(os.path.join(REPO, name), clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), clone / name)
    site = root / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(clone)]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (site / "softnce" / "configs" / "digits.py").is_file()  # setup.py's package_dir mapping
    return site, clone


def python(args, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def loaded_from(proc) -> tuple[str, str, str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, configs, model = proc.stdout.split()
    return os.path.dirname(package), configs, model


def test_a_regular_install_run_from_the_clone_root_loads_the_clone_configs(regular_install):
    site, clone = regular_install
    package, configs, model = loaded_from(python(["-c", SHOW], cwd=clone, pythonpath=site))
    assert package == str(clone / "softnce") and configs == str(clone / "configs") and model == "mlp"


def test_a_regular_install_run_elsewhere_loads_the_installed_configs(regular_install, tmp_path):
    site, _ = regular_install
    package, configs, model = loaded_from(python(["-c", SHOW], cwd=tmp_path, pythonpath=site))
    assert package == str(site / "softnce") and configs == str(site / "softnce" / "configs") and model == "mlp"


def test_the_editable_install_loads_the_clone_configs_from_anywhere(tmp_path):
    package, configs, model = loaded_from(python(["-c", SHOW], cwd=tmp_path))
    assert package == os.path.join(REPO, "softnce") and os.path.realpath(configs) == os.path.join(REPO, "configs")


@pytest.mark.parametrize("where", ["clone root", "elsewhere"])
def test_the_readme_training_command_reads_its_config_after_a_regular_install(where, regular_install, tmp_path):
    """The config file by path, ``:steps=300`` and an override: the run gets as far as checking the numbers."""
    site, clone = regular_install
    config = "configs/digits.py" if where == "clone root" else str(clone / "configs" / "digits.py")
    proc = python(["-m", "softnce.main", f"--config={config}:steps=300", "--config.optim.base_lr=-1",
                   f"--workdir={tmp_path / 'run'}"], cwd=clone if where == "clone root" else tmp_path, pythonpath=site)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "softnce: error: config.optim.base_lr = -1.0 is out of range: must be a number > 0 "
        "(the peak learning rate per 256 examples)."), proc.stderr[-3000:]
