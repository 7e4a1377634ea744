# `make demo` and `make test` create .venv, install exactly what is needed, and run.
PYTHON ?= python3
VENV ?= .venv
# A CPU build by default (a local wheel on our machines); override for CUDA, e.g.
#   make TORCH_SPEC="torch==2.11.0" test
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_NAME ?= demo_digits

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-cache-dir "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-cache-dir -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmpretrain train --config experiments/demo_digits.yaml name=$(DEMO_NAME) $(ARGS)
	$(BIN)/mmpretrain plot runs/$(DEMO_NAME)
	@echo "training curves: runs/$(DEMO_NAME)/metrics.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
