# Set-up and entry points. `make compare` (the main job) and `make test` create .venv and install everything on
# first use (CPU build of torch pinned in constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: compare test clean-venv

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

compare: $(STAMP)
	$(PY) -m fp8coat compare --variants bf16-torchopt,coat --out-dir runs/compare

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
