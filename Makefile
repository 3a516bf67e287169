# Two commands set everything up on a fresh machine:
#   make demo   - the toy experiment on CPU (the main job)
#   make test   - lint (ruff) and the whole test suite
# Another Python (3.11 or newer), in a virtual environment of its own:
#   make test PYTHON=python3.12 VENV=.venv-3.12
# The environment is made again if it was made by another Python than $(PYTHON). It holds exactly the
# tested matrix of that Python, requirements/constraints-pyX.Y.txt (passed to pip with -c; without
# such a file, for a newer Python, pip resolves setup.py's ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON_VERSION := $(shell $(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null)
PYTHON_MINOR := $(basename $(PYTHON_VERSION))
CONSTRAINTS := $(wildcard requirements/constraints-py$(PYTHON_MINOR).txt)
PIP_INSTALL := $(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP := $(VENV)/.installed-python-$(PYTHON_VERSION)

.PHONY: venv test lint docs demo clean

$(STAMP): setup.py pyproject.toml $(CONSTRAINTS)
	@test -n "$(PYTHON_VERSION)" || { echo "make: PYTHON=$(PYTHON) does not run. Name a Python 3.11 or newer," \
	  "e.g. PYTHON=/usr/bin/python3.12; with pyenv, PYTHON=\$$(pyenv root)/versions/3.12.1/bin/python3.12." >&2; exit 1; }
	@if [ "$$($(PY) -c 'import platform; print(platform.python_version())' 2>/dev/null)" != "$(PYTHON_VERSION)" ]; then \
	  echo "Creating $(VENV) with $(PYTHON) (Python $(PYTHON_VERSION))"; rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --upgrade pip
	$(PIP_INSTALL) -e ".[test]"
	rm -f $(VENV)/.installed*
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

# The API reference and guides (docs/index.md), warnings as errors, into docs/_build/html.
docs: $(STAMP)
	$(PIP_INSTALL) -e ".[docs]"
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) *.egg-info docs/_build

demo: $(STAMP)
	$(PY) -m softnce.experiments.toy
