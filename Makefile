# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(CURDIR)/.demo-data
LISTEN ?= 127.0.0.1:8000

.PHONY: setup demo test lint bench audit lock

$(STAMP): pyproject.toml scripts/setup.sh requirements.lock
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

# pip-audit over requirements.lock: exit 1 on a known vulnerability, 3 when it could
# not check (database unreachable or not knowing the packages); docs/security.md.
audit: $(STAMP)
	$(BIN)/python scripts/audit.py

# Rewrite requirements.lock from the installed .venv (after changing pyproject.toml).
lock: $(STAMP)
	{ sed -n '/^#/p' requirements.lock; $(BIN)/pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
