# Two commands do all the set-up on a fresh clone:
#   make book   executes the chapters and builds the HTML book into _build/html
#   make test   unit tests of the package, every chapter under nbval, the assignments graded
# Each creates the virtual environment $(VENV) and installs what it needs.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# Idle OpenMP threads sleep instead of spinning: much faster on a shared machine, same results.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: book test unit notebooks benchmarks clean assignments assignments-test book-student

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[test,book,assignments]"
	touch $@

book: $(VENV)/.installed
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

test: unit notebooks assignments-test

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
STUDENT_CONFIG := _build/student/_config.yml
book-student: $(VENV)/.installed
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
