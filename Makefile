# Two-command quick start: `make demo` and `make test` each create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast browser lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## the quickstart experiment: teacher, scores, pruned + distilled student, profile
	$(BIN)/m2mdc run experiment=quickstart hydra.run.dir=outputs/demo force=true

# one pytest worker per core (-n auto), tests handed out one by one and idle workers taking
# queued ones (--dist worksteal: a module fixture such as one trained run is built at most once
# per worker); every test runs torch on one thread (tests/conftest.py): no contention
test: $(STAMP) browser  ## the full test suite (slow end-to-end tests included)
	$(BIN)/python -m pytest -q -n auto --dist worksteal

# Debian's chromium for the HTML report's real-browser test (tests/test_report_html.py), when
# it is missing and apt-get can install it (root); otherwise that one test skips and says why
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium (apt-get) for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null) || echo "chromium could not be installed: the browser test will skip"; \
	  else echo "no chromium and no root apt-get: the browser test will skip"; fi; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check m2mdc tests scripts
	$(BIN)/ruff format --check m2mdc tests scripts
	$(BIN)/mypy m2mdc
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format m2mdc tests scripts
	$(BIN)/ruff check --fix m2mdc tests scripts

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --out bench.json

clean:
	rm -rf outputs multirun .pytest_cache .mypy_cache .ruff_cache
