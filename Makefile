# One entry point. `make demo` and `make test` each build the virtualenv first, so a fresh
# clone needs nothing else. PYTHON picks the interpreter that creates the venv (>= 3.11).
# TORCH_INDEX=cpu takes torch from the index PyTorch publishes its CPU wheels on (off by default,
# so pip's own configuration, a mirror or a local wheel folder, decides; see README, "Install").
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
TORCH_INDEX ?=
TORCH_CPU_INDEX = https://download.pytorch.org/whl/cpu
PIP_INDEX = $(if $(filter cpu,$(TORCH_INDEX)),--extra-index-url $(TORCH_CPU_INDEX),)

.PHONY: venv demo test test-fast test-slow test-multinode soak bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV): torch 2.13.0 is the large part (see README, Install)"
	$(PY) -m pip install --upgrade --progress-bar on pip
	$(PY) -m pip install --progress-bar on $(PIP_INDEX) -c constraints.txt -e '.[test,report,frameworks]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/supervisord-ft run --config configs/demo.toml

test: $(STAMP)
	$(PY) -m pytest -q

# Several daemons of one job on this machine (loopback, and network namespaces as root).
test-multinode: $(STAMP)
	$(PY) -m pytest -q -m multinode tests/test_multinode.py

# Tests whose subject is a long default wait (the 90 s hang floor): CI runs them too.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not e2e and not soak'

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

soak: $(STAMP)
	$(PY) -m pytest -q -m soak tests/test_soak.py

clean:
	rm -rf $(VENV) runs .pytest_cache
