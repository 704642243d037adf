# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use, install the package editable with its test extra,
# and skip the install on later runs unless setup.cfg / pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xqpass-installed
export PJRT_DEVICE ?= CPU

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m xqpass.demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
