# batchrun's developer entry points. `make demo` and `make test` each set up what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build is chosen here, not pinned for users: 2.13.0 is the CPU wheel this project's machines
# carry. On a CUDA machine: `make setup TORCH=torch` (or any CUDA build of torch >= 2.4).
TORCH ?= torch==2.13.0
OUT ?= out

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# The CPU extension (attention op, fused layer ops), into ~/.cache/batchrun (else built on first use).
	$(BIN)/python -c 'import sys; from batchrun.cpu_ext import main; sys.exit(main())'
	touch $@

demo: setup
	mkdir -p $(OUT)
	$(BIN)/batchrun plan sample_data/requests.jsonl -o $(OUT)/sample.plan
	$(BIN)/batchrun run --plan $(OUT)/sample.plan -o $(OUT)/sample.out.jsonl
	$(BIN)/batchrun stats $(OUT)/sample.out.jsonl

test: setup
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/plan_bench.py --requests 100000
	$(BIN)/python benchmarks/e2e_bench.py

lint: setup
	$(BIN)/ruff check src kernels tests benchmarks scripts

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
