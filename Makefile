# Wrenn developer entry points. Every target bootstraps what it needs on a fresh Debian 12
# machine (as root): system packages through apt, Python dependencies into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-packages
# Debian packages the platform and its tests use.
APT_PACKAGES := iproute2 procps psmisc socat util-linux postgresql nftables xfsprogs mount e2fsprogs debootstrap qemu-system-x86

.PHONY: run test lint fmt proto proto-check bench venv system clean

venv: $(STAMP)

$(STAMP): pyproject.toml
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

run: system venv
	$(VENV)/bin/wrenn-envd

test: system venv
	$(PY) -m pytest $(PYTEST_ARGS)

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

bench: system venv
	@for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
