# Wrenn developer entry points. Every target bootstraps what it needs on a fresh Debian 12
# machine (as root): system packages through apt, Python dependencies into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-packages
# Debian packages the platform and its tests use.
APT_PACKAGES := iproute2 procps psmisc socat util-linux postgresql nftables xfsprogs mount e2fsprogs debootstrap qemu-system-x86 python3-venv ca-certificates
# Where `make test` keeps the guest image the VM tests boot (the tests read the same variable).
WRENN_TEST_STATE_DIR ?= /var/lib/wrenn

.PHONY: run test lint fmt proto proto-check bench venv system image root clean

venv: $(STAMP)

# The venv needs python3-venv from the system packages.
$(STAMP): pyproject.toml | $(SYSTEM_STAMP)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

system: $(SYSTEM_STAMP)

$(SYSTEM_STAMP): Makefile
	@mkdir -p $(VENV)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages: $$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

root:
	@test "$$(id -u)" = 0 || { echo "make $(MAKECMDGOALS) needs root (apt, namespaces, taps, loop mounts)" >&2; exit 1; }

# The quick start: the guest image (built once, with progress bars), then the control plane and a
# host agent in the foreground with their state under /var/lib/wrenn; it prints the API URL, a new
# API key and an e2b SDK example once sandboxes can be created. Ctrl-C stops both.
run: root system venv
	$(VENV)/bin/wrenn template build base
	exec $(VENV)/bin/wrenn up --quickstart --grace 60

# The guest image the VM and end-to-end tests boot, built before pytest so a first build (minutes)
# shows its progress; without root those tests skip and so does this.
image: system venv
	@if [ "$$(id -u)" = 0 ]; then \
		$(VENV)/bin/wrenn template build base --state-dir "$(WRENN_TEST_STATE_DIR)"; \
	else echo "not root: no guest image, the VM tests will skip"; fi

test: system venv image
	WRENN_TEST_STATE_DIR="$(WRENN_TEST_STATE_DIR)" $(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

# Regenerates src/wrenn/gen from proto/. The generated files are committed.
proto: venv
	$(PY) scripts/gen_proto.py

proto-check: venv
	$(PY) scripts/gen_proto.py --check

# Every benchmark, then one table of the headline figures and the machine they ran on.
bench: system venv
	$(PY) bench/all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
