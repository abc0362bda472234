# Two commands do all the set-up on a fresh clone:
#   make book   builds the HTML book into _build/html from the outputs committed in the notebooks
#   make test   unit tests of the package, every chapter under nbval, then the book and its checks
# Each creates the virtual environment $(VENV) and installs what it needs.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# Idle OpenMP threads sleep instead of spinning: much faster on a shared machine, same results.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: book test unit notebooks benchmarks clean outputs repository html-check vendor

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[test,book,site]"
	touch $@

test: unit notebooks html-check

unit: $(VENV)/.installed
	$(PY) -m pytest tests

notebooks: $(VENV)/.installed
	$(PY) -m pytest --nbval-lax --nbval-cell-timeout=900 book/

benchmarks: $(VENV)/.installed
	for script in benchmarks/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf _build

# --- Publishing: committed outputs, the HTML book and its checks ------------------------------
# make outputs [CHAPTER=book/02_svd.ipynb]   re-execute chapters in place (the run a page shows)
# make repository                            rewrite every install line from _config.yml
# make html-check                            build the book, then check every page in Chromium
CHAPTER ?= book/[0-9]*.ipynb
MATHJAX := _build/vendor/mathjax/tex-mml-chtml.js

book: $(VENV)/.installed $(MATHJAX)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

html-check: book
	$(PY) .ci/check_html.py _build/html

outputs: $(VENV)/.installed
	$(PY) .ci/notebooks.py execute $(CHAPTER)

repository: $(VENV)/.installed
	$(PY) .ci/notebooks.py repository

vendor: $(MATHJAX)

$(MATHJAX): .ci/vendor/package.json .ci/vendor/package-lock.json
	npm ci --prefix .ci/vendor --ignore-scripts --no-audit --no-fund
	rm -rf _build/vendor/mathjax && mkdir -p _build/vendor
	cp -r .ci/vendor/node_modules/mathjax/es5 _build/vendor/mathjax
	cp .ci/vendor/node_modules/mathjax/LICENSE _build/vendor/mathjax/LICENSE
