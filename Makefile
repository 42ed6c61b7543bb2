# One entry point. `make demo` and `make test` each build the virtualenv first, so a fresh
# clone needs nothing else. PYTHON picks the interpreter that creates the venv (>= 3.11).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: venv demo test test-fast soak bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/supervisord-ft run --config configs/demo.toml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not e2e'

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

soak: $(STAMP)
	$(PY) -m pytest -q -m soak tests/test_soak.py

clean:
	rm -rf $(VENV) runs .pytest_cache
