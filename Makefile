# Set-up and entry points. `make compare` (the main job), `make test` (the fast suite), `make test-slow` (slow
# convergence and end-to-end tests) and `make lint` create .venv and install everything on first use (CPU build of
# torch pinned in constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: compare test test-slow lint clean-venv

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

compare: $(STAMP)
	$(PY) -m fp8coat compare --variants bf16-torchopt,coat --out-dir runs/compare

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
