# Two entry points (README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install what they need, so they work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench-cpu results clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e ".[dev,train,hf,eval]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gla.demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

bench-cpu: $(STAMP)
	$(BIN)/python -m gla.bench.ops

results: $(STAMP)
	$(BIN)/python -m gla.bench.results --out docs

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
