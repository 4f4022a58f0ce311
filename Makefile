# dynwire: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py constraints.txt | cksum | cut -d' ' -f1)

.PHONY: venv kernels data demo profile test test-fast lint format docs docs-serve bench golden clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes these wheels from local disk and never resolves a newer torch
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,docs]'
	rm -f $(VENV)/.installed-*; touch $@

# The fused aggregation kernels (C/OpenMP, optional; `pip install` builds them too) next to their
# Python code, for a source checkout. Without them the plain PyTorch kernels are used.
kernels:
	$(PY) setup.py -q build_ext --inplace

# Fashion-MNIST from Debian (IDX files under /usr/share/datasets/fashion-mnist), when apt is usable.
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	  sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST not found and apt-get unavailable: put the four IDX files in ./data/fashion-mnist"; fi

demo: venv data
	$(PY) scripts/demo.py

profile: venv
	$(VENV)/bin/dynwire profile

# one worker per core (pytest-xdist; each worker runs torch on one thread, see tests/conftest.py)
test: venv
	$(PY) -m pytest -q -n auto --maxprocesses 4

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The documentation site (MkDocs + Material + mkdocstrings) into build/site; the tables of numbers are
# rendered from the committed result files first (scripts/render_tables.py). --strict: a broken link
# or a missing API reference fails the build.
docs: venv
	$(PY) scripts/render_tables.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: venv
	$(PY) scripts/render_tables.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: venv
	$(PY) bench/train_overhead.py

golden: venv
	$(PY) scripts/regen_golden.py

clean:
	rm -rf $(VENV) runs .pytest_cache build
