# Two entry points (README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install what they need, so they work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed

# The interpreter suite runs twice: under the pinned Triton of requirements-dev.txt (the oldest supported, the GPU
# image's) and under the newest on the registry, installed beside the venv and put first on the path.
TRITON_NEWEST := 3.9.0
NEWEST := $(VENV)/triton-$(TRITON_NEWEST)

.PHONY: demo test bench-cpu results clean

# The demo needs only torch (CPU build, pinned) and the training extra; the tests add Triton and the other extras.
$(DEMO_STAMP): pyproject.toml requirements-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q -e ".[train]"
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP) requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e ".[dev,train,hf,eval,edge,distill]"
	touch $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m gla.demo

$(NEWEST)/.installed: $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(NEWEST) triton==$(TRITON_NEWEST)
	touch $@

test: $(STAMP) $(NEWEST)/.installed
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests
	PYTHONPATH=$(NEWEST) $(BIN)/python -c "import triton; assert triton.__version__ == '$(TRITON_NEWEST)', triton.__version__"
	PYTHONPATH=$(NEWEST) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests/ops/test_triton.py tests/ops/test_decode_layer.py tests/ops/test_triton_aot.py

bench-cpu: $(STAMP)
	$(BIN)/python -m gla.bench.ops

results: $(STAMP)
	$(BIN)/python -m gla.bench.results --out docs

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
