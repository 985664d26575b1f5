# claude-proxy: `make run` and `make test` work on a fresh machine (they set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run demo test test-fast check bench bench-smoke clean

# One line per step. The filter hides setuptools' notice that every editable install prints.
PIP := PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(BIN)/python -m pip \
	--disable-pip-version-check -q

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "setup: claude-proxy needs Python >= 3.11; try: make PYTHON=python3.12 $(MAKECMDGOALS)"; exit 1; }
	@echo "setup 1/3: creating $(VENV) with $$($(PYTHON) --version)"
	@$(PYTHON) -m venv $(VENV)
	@echo "setup 2/3: updating pip in $(VENV)"
	@$(PIP) install --upgrade pip
	@echo "setup 3/3: installing claude-proxy and its test tools into $(VENV) (a minute the first time)"
	@$(PIP) install -e '.[dev]'
	@touch $(STAMP)
	@echo "setup done: $(BIN)/claude-proxy"

setup: $(STAMP)

# With a config file (or CLAUDE_PROXY__UPSTREAM_URL) this runs the proxy; without, the demo.
run: setup
	@if $(BIN)/python -m claude_proxy.discovery; then \
		echo "run: a config was found: starting claude-proxy"; \
		exec $(BIN)/claude-proxy $(ARGS); \
	else \
		echo "run: no config found (see config.example.toml): starting the demo"; \
		exec $(BIN)/claude-proxy demo $(ARGS); \
	fi

demo: setup
	$(BIN)/claude-proxy demo $(ARGS)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest tests/unit -q

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# BASELINE=REF (a commit such as origin/main~3, or a checkout's path) also runs that code, A/B/A.
bench: setup
	sh bench/install-tools.sh
	$(BIN)/python -m bench $(if $(BASELINE),--baseline '$(BASELINE)') $(ARGS)

bench-smoke: setup
	sh bench/install-tools.sh
	$(BIN)/python -m bench --smoke $(if $(BASELINE),--baseline '$(BASELINE)')

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis bench/results
