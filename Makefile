# Two commands do all the set-up on a fresh clone:
#   make book   builds the HTML book into _build/html from the outputs committed in the notebooks
#   make test   unit tests, every chapter under nbval, the assignments graded, then the book and its checks
# Each creates the virtual environment $(VENV) and installs what it needs.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# Idle OpenMP threads sleep instead of spinning: much faster on a shared machine, same results.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: book test unit notebooks benchmarks clean outputs repository html-check vendor assignments \
	assignments-test book-student

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[test,book,site,assignments,imagenet]"
	touch $@

test: unit notebooks assignments-test html-check

unit: $(VENV)/.installed
	$(PY) -m pytest tests

notebooks: $(VENV)/.installed
	$(PY) -m pytest --nbval-lax --nbval-cell-timeout=900 book/

# Course assignments (Otter-Grader): student and autograder versions of assignments/NN_*.ipynb
# into assignments/dist/{student,autograder}/NN_*/; their tests grade each solution (full marks)
# and each deliberately wrong submission (its exact partial score). See book/teaching.md.
assignments: $(VENV)/.installed
	$(PY) assignments/build.py

assignments-test: $(VENV)/.installed
	$(PY) -m pytest assignments/tests

# The web book without solutions (sphinx-exercise's hide_solutions): _build/student/_build/html.
# Its config sits beside _config.yml (gitignored): the paths in a config are relative to it.
STUDENT_CONFIG := .config-student.yml
book-student: $(VENV)/.installed $(MATHJAX)
	mkdir -p _build/student
	$(PY) -c "import yaml; c = yaml.safe_load(open('_config.yml')); \
	c['execute']['execute_notebooks'] = 'off'; \
	c['sphinx'].setdefault('config', {})['hide_solutions'] = True; \
	yaml.safe_dump(c, open('$(STUDENT_CONFIG)', 'w'), sort_keys=False)"
	$(VENV)/bin/jupyter-book build . --config $(STUDENT_CONFIG) --path-output _build/student \
		-W -n --keep-going

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
