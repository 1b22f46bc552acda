# dualrec: `make run` and `make test` set everything up themselves (Debian packages, venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-system.sh
	scripts/setup-system.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: setup
	$(BIN)/dualrec-sim

lint: setup
	$(BIN)/ruff check firmware host_tools tests

test: setup lint
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=10

bench: setup
	$(BIN)/python -m tests.bench.run

# Not part of `make test` (tests/test_soak_short.py is its short version). Needs root (tmpfs).
soak: setup
	$(BIN)/python -m tests.soak.run

clean:
	rm -rf $(VENV) run .pytest_cache

# The mutation campaign against the strict verifier (tests/fuzz/campaign.py): prints tried /
# rejected / accepted / crashed / undetectable per class and the elapsed time; fails if any
# mutation is accepted or crashes it.
.PHONY: fuzz
fuzz: setup
	$(BIN)/python -m tests.fuzz.campaign --count 20000
