# Quick start: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "graceful needs Python 3.11; set PYTHON=python3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lqf demo --workdir runs/demo

# Two pytest-xdist workers: most tests are single-threaded (compiles, tiny models).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

bench: $(STAMP)
	$(PY) -m lqf bench transfer --json results/transfer.json
	$(PY) -m lqf bench accuracy --json results/lqf_accuracy_5shot.json --shots 5
	$(PY) -m lqf bench accuracy --json results/lqf_accuracy_10shot.json --shots 10
	$(PY) -m lqf bench accuracy --json results/lqf_accuracy_full.json --shots 0
	$(PY) -m lqf bench cost --json results/lqf_cost.json
	$(PY) -m lqf bench throughput --json results/throughput.json
	$(PY) -m lqf bench solve --json results/lqf_solve.json --shots 5,10
	$(PY) -m lqf bench solve --json results/lqf_solve_full.json --shots 0 --seeds 3
	$(PY) -m pc bench --json results/pc.json
	$(PY) -m bct bench --json results/bct.json

clean:
	rm -rf $(VENV) runs
