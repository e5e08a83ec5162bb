PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test run bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -x -q --durations=15

run: $(STAMP)
	$(BIN)/python experiments/run.py $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train_retrieval.py

clean:
	rm -rf $(VENV) runs
