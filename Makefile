# `make demo` and `make test` set themselves up: the first call creates .venv and installs the pinned stack.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.facetool-installed
DEMO   ?= demo-output
# A second venv without NVIDIA DALI (the optional `dali` extra): facetool installs and the portable loader's tests
# (marked `portable`) pass there. Its packages are the main venv's, hard-linked (seconds, no disk), less DALI;
# pip then installs facetool with its test extra alone and must find everything met without DALI.
NODALI       ?= .venv-nodali
NODALI_STAMP := $(NODALI)/.facetool-installed

.PHONY: venv test test-nodali lint demo gpu-check clean

venv: $(STAMP)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23" "setuptools>=64" wheel
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,dali]"
	touch $(STAMP)

$(NODALI_STAMP): $(STAMP)
	rm -rf $(NODALI)
	$(PY) -m venv --without-pip $(NODALI)
	cp -al $(VENV)/lib/. $(NODALI)/lib/
	rm -rf $(NODALI)/lib/python3*/site-packages/nvidia/dali $(NODALI)/lib/python3*/site-packages/nvidia_dali_*
	$(NODALI)/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
	@if $(NODALI)/bin/python -c "import nvidia.dali" 2>/dev/null; then \
		echo "$(NODALI): NVIDIA DALI came back with facetool's own requirements"; exit 1; fi
	touch $(NODALI_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) $(NODALI_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -c "import nvidia.dali"  # the main run tests the DALI pipeline itself: never skipped for want of it
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-nodali

# the portable loader's training, loader and verification tests where DALI is not installed
test-nodali: $(NODALI_STAMP)
	$(NODALI)/bin/python -m pytest -q -m portable -p no:cacheprovider

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh $(DEMO)

# every GPU figure in one run (one GPU, under 8 minutes); the report goes to gpu-report.json
gpu-check: $(STAMP)
	$(PY) -m facetool bench gpu --json gpu-report.json

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info $(NODALI)
