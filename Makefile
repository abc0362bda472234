# Two commands do all the set-up on a fresh clone:
#   make book   executes the chapters and builds the HTML book into _build/html
#   make test   unit tests of the package, then every chapter under nbval
# Each creates the virtual environment $(VENV) and installs what it needs.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# Idle OpenMP threads sleep instead of spinning: much faster on a shared machine, same results.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: book test unit notebooks benchmarks clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[test,book]"
	touch $@

book: $(VENV)/.installed
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

test: unit notebooks

unit: $(VENV)/.installed
	$(PY) -m pytest tests

notebooks: $(VENV)/.installed
	$(PY) -m pytest --nbval-lax --nbval-cell-timeout=900 book/

benchmarks: $(VENV)/.installed
	for script in benchmarks/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf _build
