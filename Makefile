# `make demo` and `make test` set themselves up: the first call creates .venv and installs the pinned stack.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.facetool-installed
DEMO   ?= demo-output

.PHONY: venv test lint demo gpu-check clean

venv: $(STAMP)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23" "setuptools>=64" wheel
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh $(DEMO)

# every GPU figure in one run (one GPU, under 8 minutes); the report goes to gpu-report.json
gpu-check: $(STAMP)
	$(PY) -m facetool bench gpu --json gpu-report.json

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info
