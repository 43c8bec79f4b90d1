# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install prx, train the CPU demo and evaluate it
#   make test   create .venv, install prx with test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo

.PHONY: venv demo test test-fast bench clean

$(BIN)/prx: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel lies on these machines' disk (a bare `torch` pulls a CUDA build)
	$(BIN)/pip install -q torch==2.13.0 numpy
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/prx

venv: $(BIN)/prx

demo: venv
	$(BIN)/prx train --out $(RUN)
	$(BIN)/prx eval --checkpoint $(RUN)
	$(BIN)/prx sample --checkpoint $(RUN) --prompt "a red circle in the top left" --out $(RUN)/cli_samples

test: venv
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q tests

test-fast: venv  # the tier a developer runs while working (≤ 2 min on 2 cores)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: venv
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs
