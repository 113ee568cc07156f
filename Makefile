# Quick start: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install data clean

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

# Fashion-MNIST's four IDX files: the Debian package where apt-get and root (or sudo) are
# there (updating the package lists if the first try fails), otherwise how to get them.
# The files may also lie anywhere GRACEFUL_FASHION_MNIST_DIR (or data.idx_dir) points.
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
	t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

data:
	@missing=0; \
	for f in $(FASHION_MNIST_FILES); do [ -f $(FASHION_MNIST_DIR)/$$f ] || missing=1; done; \
	if [ $$missing = 0 ]; then \
	  echo "Fashion-MNIST is in $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null && \
	    { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get install -y dataset-fashion-mnist || \
	    { $$sudo apt-get update && $$sudo apt-get install -y dataset-fashion-mnist; }; \
	else \
	  echo "Cannot install the Debian package dataset-fashion-mnist here" \
	    "(it needs apt-get, and root or sudo)."; \
	  echo "Download $(FASHION_MNIST_FILES)"; \
	  echo "from https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)" \
	    "into a directory, then:"; \
	  echo "export GRACEFUL_FASHION_MNIST_DIR=/that/directory (or set data.idx_dir)"; \
	  exit 1; \
	fi

# Two pytest-xdist workers: most tests are single-threaded (compiles, tiny models).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

# Fashion-MNIST first (it needs `make data`); the digits benchmarks stay until LQF's
# accuracy benchmark has its Fashion-MNIST version (issue 16, item 3).
bench: $(STAMP) data
	$(PY) -m lqf bench transfer --config fashion_transfer --shots 10,100 --seeds 5 \
	    --json results/fashion_transfer.json
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
