# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_CACHE ?= /tmp/metastone-pip-cache
PIP := $(PY) -m pip --cache-dir $(PIP_CACHE) --disable-pip-version-check -q

.PHONY: demo test lint format install install-test clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=24"
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install -e .
	touch $@

# torch is pinned to the CPU build that lies on disk; an unpinned torch pulls a multi-GB GPU build.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/metastone-jax demo

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check metastone_jax tests bench launch
	$(VENV)/bin/ruff format --check metastone_jax tests bench launch
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check --fix metastone_jax tests bench launch
	$(VENV)/bin/ruff format metastone_jax tests bench launch

clean:
	rm -rf $(VENV) .pytest_cache
