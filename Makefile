# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(CURDIR)/.demo-data
LISTEN ?= 127.0.0.1:8000

.PHONY: setup demo test lint bench

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(PY) $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	@$(BIN)/python -m gateway demo --data $(DATA) --listen $(LISTEN)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
