# dualrec: `make run` and `make test` set everything up themselves (Debian packages, venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench soak clean deb arm64-check

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
	$(BIN)/ruff check firmware host_tools tests packaging

test: setup lint
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=10

bench: setup
	scripts/setup-bench.sh
	$(BIN)/python -m tests.bench.run

# Not part of `make test` (tests/test_soak_short.py is its short version). Needs root (tmpfs).
soak: setup
	$(BIN)/python -m tests.soak.run

clean:
	rm -rf $(VENV) run .pytest_cache

# The box's Debian packages (packaging/build_deb.py): one per Raspberry Pi OS release, arm64 by
# default (DEB_ARCH=amd64 for a PC); the wheels are downloaded once into build/wheels.
DEB_ARCH ?= arm64
deb: setup
	$(BIN)/python packaging/build_deb.py --suite bookworm --suite trixie --arch $(DEB_ARCH)

# Not part of `make test`: the arm64 package installed offline into a Debian arm64 root
# (debootstrap + qemu-user-static, scripts/setup-arm64.sh), then check-config, diag and the
# gateway for 10 s on the sim board under emulation. Needs root.
arm64-check: setup
	scripts/setup-arm64.sh
	$(BIN)/python packaging/build_deb.py --suite bookworm --arch arm64
	$(BIN)/python packaging/arm64_check.py

# The mutation campaign against the strict verifier (tests/fuzz/campaign.py): prints tried /
# rejected / accepted / crashed / undetectable per class and the elapsed time; fails if any
# mutation is accepted or crashes it.
.PHONY: fuzz
fuzz: setup
	$(BIN)/python -m tests.fuzz.campaign --count 20000
