# Two commands on a fresh machine: `make run` (the whole pipeline on the embedded default) and
# `make test`. Both install first, from the committed lock (constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m ray_jobs.local_cluster dvc repro

test: install
	$(BIN)/python -m pytest -q --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# CPU benchmarks at small settings (a few minutes): tables on stdout, JSON in benchmarks/results/.
# The GPU suite is benchmarks/gpu.sh; see BENCHMARKS.md.
bench: install
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python -m benchmarks.train_step --presets DiT-S/2,DiT-B/2 --variants fp32,bf16 --batch-size 8 --rounds 3 --steps 2 --warmup 1
	$(BIN)/python -m benchmarks.sampling --preset DiT-S/2 --batch-size 4 --rounds 2 --max-evals 3

clean:
	rm -rf data models samples checkpoints metrics mlruns mlflow.db .dvc/cache .dvc/tmp
