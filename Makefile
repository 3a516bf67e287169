# Two commands set everything up on a fresh machine:
#   make demo   - the toy experiment on CPU (the main job)
#   make test   - the whole test suite
# Another Python (3.11 or newer), in a virtual environment of its own:
#   make test PYTHON=python3.12 VENV=.venv-3.12
# The environment is made again if it was made by another Python than $(PYTHON).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON_VERSION := $(shell $(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null)
STAMP := $(VENV)/.installed-python-$(PYTHON_VERSION)

.PHONY: venv test demo bench clean

$(STAMP): setup.py pyproject.toml
	@test -n "$(PYTHON_VERSION)" || { echo "make: PYTHON=$(PYTHON) does not run. Name a Python 3.11 or newer," \
	  "e.g. PYTHON=/usr/bin/python3.12; with pyenv, PYTHON=\$$(pyenv root)/versions/3.12.1/bin/python3.12." >&2; exit 1; }
	@if [ "$$($(PY) -c 'import platform; print(platform.python_version())' 2>/dev/null)" != "$(PYTHON_VERSION)" ]; then \
	  echo "Creating $(VENV) with $(PYTHON) (Python $(PYTHON_VERSION))"; rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	rm -f $(VENV)/.installed*
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

clean:
	rm -rf $(VENV) *.egg-info

demo: $(STAMP)
	$(PY) -m softnce.experiments.toy
